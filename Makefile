VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export AXOLOTL_DO_NOT_TRACK := 1

.PHONY: run test gpu-test lint install bench bench-data

$(STAMP): pyproject.toml builder/setup_venv.sh builder/constraints.txt $(wildcard builder/requirements*.txt)
	bash builder/setup_venv.sh
	touch $(STAMP)

install: $(STAMP)

## run the embedded default job (test_input.json: a tiny model, on CPU)
run: $(STAMP)
	$(VENV)/bin/finetune-worker run test_input.json

## run the static checks and the test suite
test: lint
	$(VENV)/bin/python -m pytest

## GPU acceptance tests (tests/test_gpu.py, docs/development.md "GPU acceptance tests"): on a machine with CUDA,
## in a venv (.venv) or in the image (its python); without a GPU they all skip
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python)
gpu-test:
	PYTHONPATH=$(CURDIR)/src $(GPU_PYTHON) -m pytest -m gpu -v -s

## benchmarks that print figures (docs/benchmarks.md): overhead, startup, warm start
bench: $(STAMP)
	$(VENV)/bin/python bench/run.py

## the data step's row check on 10K/100K/1M-row JSON Lines: rows/s, MB/s, peak RSS (ARGS=--huge adds 2 GB)
bench-data: $(STAMP)
	$(VENV)/bin/python bench/data_check.py $(ARGS)

## static checks: code, Dockerfile, workflows, RunPod Hub files, version pins
lint: $(STAMP)
	$(VENV)/bin/python -m ruff check src tests builder bench
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/check-jsonschema --schemafile builder/schemas/runpod-hub.schema.json .runpod/hub.json
	$(VENV)/bin/check-jsonschema --schemafile builder/schemas/runpod-tests.schema.json .runpod/tests.json
	$(VENV)/bin/python builder/check_versions.py
	@if command -v npm >/dev/null 2>&1; then \
	  (cd builder/lint && npm ci --silent --no-audit --no-fund) && \
	  for f in .github/workflows/*.yml; do builder/lint/node_modules/.bin/action-validator "$$f" || exit 1; done && \
	  echo "action-validator: workflows ok"; \
	else echo "npm not found: action-validator skipped"; fi
