"""The NNX serving benchmark (experiments/bench_serving_nnx.py) and the served-generation check
(experiments/lib/serving.py, run on the real Gemma 3 270M by experiments/serve_gemma3.py)."""

import dataclasses
import json
import sys

import jax
import pytest

import mos_jax
from experiments.lib import bench

pytest.importorskip("tunix.models.gemma3.model", reason="needs Tunix (`pip install mos_jax[tunix]`)")

from experiments import bench_serving_nnx  # noqa: E402


def test_targets_are_read_on_the_interval():
  assert bench_serving_nnx.verdict({"median": 1.3, "ci95": [1.21, 1.4]}, 1.2) == "met"
  assert bench_serving_nnx.verdict({"median": 1.1, "ci95": [1.05, 1.19]}, 1.2) == "missed"
  assert bench_serving_nnx.verdict({"median": 1.25, "ci95": [1.15, 1.3]}, 1.2) == "unclear"  # the point alone passes


def test_shuffled_rounds_time_every_call_once_per_round_in_varying_orders():
  seen = []
  calls = [lambda j=j: seen.append(j) for j in range(4)]
  times = bench.time_round_robin(calls, 6, shuffle=0)
  assert [len(t) for t in times] == [6] * 4
  rounds = [tuple(seen[4 + 4 * i:8 + 4 * i]) for i in range(6)]  # after the 4 warm-up calls
  assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
  assert len(set(rounds)) > 2  # not one fixed order (nor a forward/reversed alternation)


@pytest.mark.slow  # the benchmark's quick run for 2 adapters, in this process (compiles its 6 calls)
def test_quick_run_writes_every_variant_ratio_and_the_stack_memory(tmp_path, monkeypatch, capsys):
  out = tmp_path / "bench.json"
  argv = ["bench_serving_nnx", "--quick", "--adapters", "2", "--repeats", "2", "--out", str(out)]
  monkeypatch.setattr(sys, "argv", argv)
  bench_serving_nnx.main()
  assert "mixed / 1-at-a-time" in capsys.readouterr().out
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert [r["adapters"] for r in rows] == [2] and "run" in result
  for r in rows:
    for job in ("forward", "decode"):
      j = r[job]
      assert j["mixed_tokens_per_s"] > 0 and j["one_tokens_per_s"] > 0 and j["base_tokens_per_s"] > 0
      assert j["mixed_speedup"]["rounds"] == 2
  assert "target" not in rows[0]["forward"] and rows[0]["rows_per_adapter"] * 2 == rows[0]["rows"]
  m = result["stack_memory"]
  assert m["adapters"] == 2 and m["pools_bytes"] == 2 * m["per_adapter_pools_bytes"] > 0
  assert rows[-1]["memory"]["mixed forward"]["available"] in (True, False)


@pytest.mark.slow  # three Tunix samplers compile prefill + decode on a tiny Gemma 3 (~10 s)
def test_served_rows_equal_each_adapter_alone_and_the_adapters_change_the_tokens():
  from tunix.generate import sampler as sampler_lib

  from experiments.lib import serving
  from nnx.test_serving import Tokenizer
  from oracles.gemma3 import tiny_gemma3

  model = tiny_gemma3()
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=mos_jax.nnx.GEMMA3_TARGETS)
  adapters = serving.random_adapters(model, config, 3, scale=0.3)
  ids = [0, 2, -1, 1, 1]
  cache = sampler_lib.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
  rows, seconds = serving.check_served_generation(model, Tokenizer(), adapters, ["hello", "hi there", "abc", "xyz!",
                                                                                 "mixture"], ids, cache,
                                                  max_generation_steps=6, eos_tokens=[1])
  assert [r.adapter for r in rows] == ids and all(r.equal for r in rows)
  assert sum(r.changed for r in rows if r.adapter >= 0) >= 3  # a row given the wrong adapter would differ
  assert not rows[2].changed  # the base row is the base model's
  assert {"served", "base", "adapter 0 alone"} <= set(seconds)
  # The adapters differ from each other: swapping them into the single-adapter sampler took effect.
  assert len({float(jax.tree_util.tree_leaves(a.pools)[0].ravel()[0]) for a in adapters}) == 3
  with pytest.raises(ValueError, match="one spec"):
    other = serving.random_adapters(model, dataclasses.replace(config, seed=1), 1, scale=0.3)
    serving.check_served_generation(model, Tokenizer(), [adapters[0], *other], ["a"], [0], cache,
                                    max_generation_steps=1)
