# The two commands a new user runs; each sets up ./.venv itself (install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo_out

.PHONY: setup demo test test-all

setup:
	bash install.sh

demo: setup
	$(VENV)/bin/xtuner-vitask demo --out $(OUT)

# The fast suite plus the end-to-end runs through xtuner's train tool.
test: setup
	$(PY) -m pytest -q tests

# Only the fast unit tests (no training runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
