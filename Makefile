# The stable interface: make up [TLS=1] | down | status | demo | test | bench | lint.
# `make test` and `make demo` work on a fresh Debian/Ubuntu machine: they install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv up down status demo test lint typecheck bench clean

venv: $(STAMP)

# Re-installs only when pyproject.toml changed, so a warm `make up` stays fast.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# `make up TLS=1` also prints the DATALAYER_* exports that point every client at TLS (verified).
up: venv
	@stack/stack.sh up $(if $(filter 1 yes true,$(TLS)),--tls)

down:
	@stack/stack.sh down

status:
	@stack/stack.sh status

# Customers' personal fields are sealed under a master key from the environment. When none is set,
# the demo uses a throwaway key kept beside the local stack's state (like its TLS CA), made once.
STATE_DIR := $(or $(DATALAYER_STATE_DIR),$(CURDIR)/.stack)
demo: up
	@if [ -z "$$DATALAYER_MASTER_KEY$$DATALAYER_MASTER_KEY_FILE" ]; then \
	  key="$(STATE_DIR)/master.key"; \
	  test -f "$$key" || $(VENV)/bin/datalayer keys new-master --file "$$key" >/dev/null || exit 1; \
	  echo "demo: DATALAYER_MASTER_KEY_FILE=$$key (a throwaway key of the local stack)"; \
	  export DATALAYER_MASTER_KEY_FILE="$$key"; \
	fi; \
	$(VENV)/bin/datalayer demo

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: up lint
	@$(VENV)/bin/pytest; rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: up
	@set -e; shopt -s nullglob; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

clean: down
	rm -rf .stack
