"""The levers that experiments/bench_levers.py times compute the same loss and gradients.

A benchmark of ways to compute the low-rank term is only fair if every way computes the same
thing: each lever's loss and pool gradients (experiments/lib/levers.py) against the plain formula
(autodiff of ``scale · (x Aᵀ) Bᵀ``), on the benchmark's own (tiny) HF Llama.
"""

import jax
import numpy as np
import pytest

import mos_jax
from experiments.lib import levers
from experiments.lib import bench
from oracles.helpers import assert_close, hf_numerics, random_pools


@pytest.fixture(scope="module")
def setup():
  s = bench.CORE_QUICK
  with hf_numerics():
    model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench.llama_loss_fn(model)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig.lora(s.rank))
  adapter = adapter.replace(pools=jax.tree_util.tree_map(lambda p: 0.1 * p, random_pools(adapter.pools, seed=3)))
  return params, batch, loss_fn, adapter


def grads_of(lever, setup):
  params, batch, loss_fn, adapter = setup

  def loss(adapter):
    with hf_numerics():
      if lever == "library inject":
        return mos_jax.linen.adapted_loss(loss_fn)(adapter, params, batch)
      with levers.inject_lever(adapter, lever):
        return loss_fn(params, batch)

  return jax.jit(jax.value_and_grad(loss))(adapter)


@pytest.fixture(scope="module")
def plain(setup):
  return grads_of("plain", setup)


# Each lever compiles its own step (~10 s): the library's own path runs by default, the benchmark's variants in the
# slow suite.
@pytest.mark.parametrize("lever", [pytest.param(lv, marks=pytest.mark.slow) for lv in levers.LEVERS if lv != "plain"]
                         + ["library inject"])
def test_every_lever_computes_the_plain_formulas_loss_and_gradients(lever, setup, plain):
  want_loss, want = plain
  got_loss, got = grads_of(lever, setup)
  assert_close(got_loss, want_loss, rtol=1e-5)
  for name in want.pools:
    for f in ("A", "B"):
      w = np.asarray(want.pools[name][f])
      assert np.abs(w).max() > 0, (name, f)
      assert np.abs(np.asarray(got.pools[name][f]) - w).max() <= 1e-5 * np.abs(w).max(), (lever, name, f)
