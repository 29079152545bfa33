"""bench_passes: the passes it times are the term's, at the shapes the model adapts."""

import collections

import numpy as np

import mos_jax
from experiments import bench_passes
from experiments.lib import bench
from oracles.helpers import assert_close


def test_projection_shapes_are_the_llamas_seven_projections_per_layer():
  s = bench.CORE_QUICK  # GQA like the documented sizes: k/v narrower than q
  adapter = mos_jax.adapt(bench.build_llama(s).params, bench.core_mos_config(s))
  kv = s.kv_heads * (s.hidden // s.heads)
  per_layer = [(s.hidden, s.hidden), (s.hidden, kv), (s.hidden, kv), (s.hidden, s.hidden),  # q, k, v, o
               (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]  # gate, up, down
  assert bench_passes.projection_shapes(adapter) == collections.Counter(per_layer * s.layers)


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

