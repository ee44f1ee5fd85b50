# fedmed: two commands on a fresh machine -- `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-federation
DEMO_RUN ?= runs/demo

.PHONY: install demo test lint typecheck bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is installed on its own first, pinned, so that pip takes the local CPU wheel
# instead of resolving the CUDA build through another package's requirement.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4,<3"
	$(BIN)/python -m pip install -q -e ".[dev,tracking]"
	touch $(STAMP)

install: $(STAMP)

# FedAvg only, to stay within 15 minutes on 2 cores; add arms with
#   .venv/bin/fedmed compare --config $(DEMO_DIR)/federation.yaml --out $(DEMO_RUN) --strategies fedavg,fedprox,fedbn
# (the finished arms are reused, only the new ones train).
demo: $(STAMP)
	$(BIN)/fedmed data synth --out $(DEMO_DIR) --force --workers 2
	$(BIN)/fedmed compare --config $(DEMO_DIR)/federation.yaml --out $(DEMO_RUN) --strategies fedavg

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy fedmed server client

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out docs/benchmarks.md

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
