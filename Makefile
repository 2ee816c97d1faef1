# The two commands of the README: `make demo` and `make test`. Both start with `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system demo test lint bench clean

setup: system $(STAMP)

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	@set -e; if [ ! -x $(PY) ]; then \
	  py=$$(bash scripts/find-python.sh); echo "Creating $(VENV) with $$py"; \
	  "$$py" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check butlerfs wrapper tests scripts
	$(VENV)/bin/mypy

bench: setup
	@for b in scripts/bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
