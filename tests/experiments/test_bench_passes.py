"""bench_passes: the passes it times are the term's, at the shapes the model adapts."""

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

import mos_jax
from experiments import bench_passes
from experiments.lib import bench
from oracles.helpers import REPO_ROOT, assert_close


@pytest.mark.parametrize("sizes", [bench.CORE_QUICK, bench.CORE_PRESETS[256]], ids=["quick", "hidden256"])
def test_projection_shapes_are_the_adapted_layers_of_the_benchmarked_llama(sizes):
  params = bench.build_llama(sizes).params
  factors = mos_jax.core.layer_factors(mos_jax.adapt(params, mos_jax.MoSConfig.lora(sizes.rank)))
  adapted = collections.Counter((a.shape[1], b.shape[0]) for a, b in factors.values())  # A (r, d_in), B (d_out, r)
  assert bench_passes.projection_shapes(sizes) == adapted


def test_each_pass_computes_its_formula():
  rng = np.random.default_rng(0)
  t, d_in, d_out, r = 6, 5, 7, 3
  x, g, y, dx = (rng.standard_normal(s) for s in [(t, d_in), (t, d_out), (t, d_out), (t, d_in)])
  a, b, h, dh = (rng.standard_normal(s) for s in [(r, d_in), (d_out, r), (t, r), (t, r)])
  want = {"h = x Aᵀ": ((x, a), x @ a.T), "y + h Bᵀ (fused)": ((y, h, b.T), y + h @ b.T), "dh = g B": ((g, b), g @ b),
          "dA = dhᵀ x": ((dh, x), dh.T @ x), "dBᵀ = hᵀ g": ((h, g), h.T @ g),
          "dx + dh A (fused)": ((dx, dh, a), dx + dh @ a)}
  assert set(want) == {name for name, _, _ in bench_passes.PASSES}
  for name, fn, shape_fn in bench_passes.PASSES:
    args, expected = want[name]
    assert [np.shape(v) for v in args] == shape_fn(t, d_in, d_out, r), name
    assert_close(np.asarray(fn(*(np.float32(v) for v in args))), expected, rtol=1e-5)


@pytest.mark.slow  # a benchmark's quick run in a subprocess (~30 s): the slow suite runs it
def test_quick_run_writes_every_pass_and_the_ratios_with_intervals(tmp_path):
  out = tmp_path / "bench_passes.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_passes", "--quick", "--out", str(out)],
                 check=True, capture_output=True, timeout=600, cwd=REPO_ROOT)
  r = json.loads(out.read_text())
  assert sum(r["projections"].values()) == 7 * bench.CORE_QUICK.layers
  assert set(r["passes_by_kind"]) == {name for name, _, _ in bench_passes.PASSES}
  assert all(v["cold_ms"] > 0 for v in r["passes_by_kind"].values()) and r["per_call_us"] > 0
  for k in ("hot_passes_over_floor", "cold_passes_over_floor", "step_over_floor"):
    assert r[k]["ci95"][0] <= r[k]["median"] <= r[k]["ci95"][1] and r[k]["rounds"] == r["rounds"]
  assert r["cold_passes_over_floor"]["median"] > 1 and r["step_over_floor"]["median"] > 1
  assert len(r["run"]["loadavg_before"]) == 3
