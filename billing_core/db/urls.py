"""One database URL for every driver: libpq form for psycopg, +psycopg for SQLAlchemy."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from billing_core.errors import InvalidRequest


def libpq_url(url: str) -> str:
    """The URL as psycopg/libpq wants it (no SQLAlchemy driver suffix)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in {"postgresql", "postgres"}:
        raise InvalidRequest(f"DATABASE_URL must be a postgresql:// URL, got scheme {scheme!r}")
    return urlunsplit(parts._replace(scheme="postgresql"))


def sqlalchemy_url(url: str) -> str:
    """The URL as SQLAlchemy wants it, using the psycopg 3 driver."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def with_database(url: str, database: str) -> str:
    """The same server, another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))
