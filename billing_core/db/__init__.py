"""Schema (SQLAlchemy models), migrations and database access."""
