# Billing and quota platform. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PY_PACKAGES := billing_core quota_service control_plane stripe_emulator clients/python/src/quota_client scripts tests bench examples

.DEFAULT_GOAL := help
.PHONY: help install run test test-browser screenshots lint fmt proto check-generated bench reliability clean

help: ## list the targets with one line each
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e clients/python -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (done by the other targets)

run: $(STAMP) ## start PostgreSQL (embedded unless DATABASE_URL), the sidecar and the control plane
	$(PY) scripts/run.py

lint: $(STAMP) ## ruff (lint + format check), mypy --strict, import-linter contracts, buf lint and buf breaking
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(PY_PACKAGES)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/buf lint
	@if git rev-parse --verify --quiet main >/dev/null; then $(VENV)/bin/buf breaking --against '.git#branch=main'; fi

fmt: $(STAMP) ## format and auto-fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: $(STAMP) ## regenerate the gRPC stubs (clients/python/src/quota) from proto/
	$(PY) scripts/gen_proto.py

check-generated: $(STAMP) ## fail when the committed stubs differ from a fresh generation
	$(PY) scripts/gen_proto.py --check

test: $(STAMP) lint check-generated ## all quality gates, then the whole test suite (the browser tests last)
	scripts/apt_ensure.sh /usr/sbin/pgbouncer pgbouncer
	scripts/apt_ensure.sh /usr/bin/promtool prometheus
	$(PY) -m pytest
	$(MAKE) test-browser

test-browser: $(STAMP) ## the billing and admin pages in Debian's Chromium (apt-installs it when missing)
	scripts/ensure_chromium.sh
	$(PY) -m pytest tests/browser --screenshot only-on-failure --output .artifacts/browser

screenshots: $(STAMP) ## render the main pages with demo data into docs/screenshots/
	scripts/ensure_chromium.sh
	$(PY) -m pytest tests/browser/screenshots.py --output .artifacts/screenshots

bench: $(STAMP) ## benchmarks side by side with an echo server and the textbook implementation (README: Performance)
	scripts/apt_ensure.sh /usr/sbin/pgbouncer pgbouncer
	$(PY) -m bench

RELIABILITY_SCALE ?= 20
RELIABILITY_SUITES := tests/reliability tests/e2e/test_grpc_fuzz.py tests/e2e/test_fail_open_spool.py \
	tests/billing/test_webhooks.py tests/api/test_openapi_conformance.py
reliability: $(STAMP) ## fault, storm and fuzz suites with larger counts (minutes); writes docs/reliability.md
	scripts/apt_ensure.sh /usr/sbin/pgbouncer pgbouncer
	@mkdir -p .artifacts && rm -f .artifacts/reliability.jsonl
	@start=$$(date +%s); \
	RELIABILITY_SCALE=$(RELIABILITY_SCALE) RELIABILITY_REPORT=$(CURDIR)/.artifacts/reliability.jsonl \
		$(PY) -m pytest -q $(RELIABILITY_SUITES) && \
	$(PY) scripts/reliability_report.py .artifacts/reliability.jsonl docs/reliability.md \
		$(RELIABILITY_SCALE) $$(( $$(date +%s) - start ))

clean: ## remove .venv and .data (stops nothing that is running)
	rm -rf $(VENV) .data
