# Two commands do all set-up on a fresh Debian/Ubuntu machine (as root):
#   make matrix   build and smoke-test the default recipe set (RECIPES=qwen3/fastapi to choose; LANES="default cu13"
#                 or LANES=all also builds the GPU lanes of task.yaml `lanes:`, tag :cu13)
#   make test     the test suite (Docker integration tests included)
SHELL := /bin/bash
PY := .venv/bin/python
RECIPES ?= qwen3/fastapi
REPORT_DIR ?= reports/latest
BASE ?= auto
ONLY := $(foreach r,$(RECIPES),--only $(r))
export TESTCONTAINERS_RYUK_DISABLED := true

.PHONY: setup matrix test lock lint list clean publish

setup:
	bash scripts/setup_host.sh

matrix: setup
	$(PY) scripts/build_matrix.py $(ONLY) --base $(BASE) --report-dir $(REPORT_DIR) $(if $(STACK_FROM),--stack-from $(STACK_FROM)) $(foreach l,$(LANES),--lane $(l))

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# make publish REGISTRY=127.0.0.1:5000/selfllm RECIPES="qwen3/fastapi qwen3/lora": push images whose last smoke
# result in reports/latest is a PASS of the image here now (and the base and stacks under them).
publish: setup
	$(PY) scripts/build_matrix.py publish --registry "$(REGISTRY)" $(ONLY) --report-dir $(REPORT_DIR)

lock: setup
	$(PY) scripts/build_matrix.py lock $(ONLY)

list: setup
	$(PY) scripts/build_matrix.py list

clean:
	rm -rf .selfllm-cache reports
	docker image prune -f
