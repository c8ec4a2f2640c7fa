# Two commands do all set-up on a fresh Debian/Ubuntu machine (as root):
#   make matrix   build and smoke-test the default recipe set (RECIPES=qwen3/fastapi to choose)
#   make test     the test suite (Docker integration tests included)
SHELL := /bin/bash
PY := .venv/bin/python
RECIPES ?= qwen3/fastapi
REPORT_DIR ?= reports/latest
BASE ?= auto
ONLY := $(foreach r,$(RECIPES),--only $(r))
export TESTCONTAINERS_RYUK_DISABLED := true

.PHONY: setup matrix test lock lint list clean

setup:
	bash scripts/setup_host.sh

matrix: setup
	$(PY) scripts/build_matrix.py $(ONLY) --base $(BASE) --report-dir $(REPORT_DIR)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lock: setup
	$(PY) scripts/build_matrix.py lock $(ONLY)

list: setup
	$(PY) scripts/build_matrix.py list

clean:
	rm -rf .selfllm-cache reports
	docker image prune -f
