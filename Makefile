VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export AXOLOTL_DO_NOT_TRACK := 1

.PHONY: run test lint install

$(STAMP): pyproject.toml builder/setup_venv.sh builder/constraints.txt $(wildcard builder/requirements*.txt)
	bash builder/setup_venv.sh
	touch $(STAMP)

install: $(STAMP)

## run the embedded default job (test_input.json: a tiny model, on CPU)
run: $(STAMP)
	$(VENV)/bin/finetune-worker run test_input.json

## run the test suite
test: $(STAMP)
	$(VENV)/bin/python -m ruff check src tests
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check src tests
