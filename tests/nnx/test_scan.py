"""NNX models whose layers are created with nnx.vmap and run with nnx.scan (Flax's GSPMD-guide pattern).

Oracle: the scanned model against the same weights unrolled (an nnx.List of blocks) with the same
routing and pools: equal outputs and equal pool gradients, layer axis 0 and 1, private shards, l > 1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mos_jax
from oracles.helpers import assert_close, random_pools

L = 4
NAMES = ("q", "up", "down")


class Block(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(16, 16, rngs=rngs)
    self.up = nnx.Linear(16, 24, rngs=rngs)
    self.down = nnx.Linear(24, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.q(x))))


class Scanned(nnx.Module):
  def __init__(self, axis, rngs):
    self.axis = axis

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=axis)
    def create(rngs):
      return Block(rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.layers)


class Unrolled(nnx.Module):
  def __init__(self, scanned):
    axis = scanned.axis
    self.layers = nnx.List([Block(nnx.Rngs(0)) for _ in range(L)])
    for i, block in enumerate(self.layers):
      for name in NAMES:
        for leaf in ("kernel", "bias"):
          getattr(getattr(block, name), leaf)[...] = jnp.take(getattr(getattr(scanned.layers, name), leaf)[...], i,
                                                               axis=axis)

  def __call__(self, x):
    for block in self.layers:
      x = block(x)
    return x


def same_spec(scanned_adapter, unrolled_adapter):
  leaf = lambda g: g.name.split("/")[-1]
  by_leaf = {leaf(g): g.name for g in scanned_adapter.groups}
  spec = mos_jax.core.AdapterSpec(
      config=unrolled_adapter.config, groups=unrolled_adapter.groups,
      index_a={g.name: scanned_adapter.spec.index_a[by_leaf[leaf(g)]] for g in unrolled_adapter.groups},
      index_b={g.name: scanned_adapter.spec.index_b[by_leaf[leaf(g)]] for g in unrolled_adapter.groups})
  return mos_jax.Adapter(pools={g.name: scanned_adapter.pools[by_leaf[leaf(g)]] for g in unrolled_adapter.groups},
                         spec=spec)


@pytest.mark.parametrize("axis", [0, 1])
def test_scanned_nnx_equals_unrolled_outputs_and_pool_gradients(axis):
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  model = Scanned(axis, nnx.Rngs(0))
  assert model.layers.q.kernel[...].shape == ((L, 16, 16) if axis == 0 else (16, L, 16))
  base_out = model(x)
  unrolled_model = Unrolled(model)
  assert_close(unrolled_model(x), base_out, rtol=1e-5)

  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=NAMES)
  scanned = mos_jax.nnx.adapt(model, dataclasses.replace(config, stacked_modules=NAMES, layer_axis=axis))
  adapter = mos_jax.nnx.adapter_of(scanned)
  assert all(g.stacked and g.num_layers == L and g.layer_axis == axis for g in adapter.groups)
  lora = nnx.state(scanned, nnx.LoRAParam)
  assert sum(v.size for v in jax.tree_util.tree_leaves(lora)) == \
      mos_jax.core.trainable_count(adapter.config, adapter.groups)
  assert_close(scanned(x), base_out, rtol=1e-5)  # B = 0 at init
  adapter = adapter.replace(pools=jax.tree_util.tree_map(lambda p: 0.1 * p, random_pools(adapter.pools, seed=3)))
  mos_jax.nnx.load_pools(scanned, adapter)
  unrolled = mos_jax.nnx.adapt(unrolled_model, same_spec(adapter, mos_jax.nnx.adapter_of(
      mos_jax.nnx.adapt(unrolled_model, config))))
  out = scanned(x)
  assert_close(out, unrolled(x), rtol=1e-5)
  assert np.abs(np.asarray(out) - np.asarray(base_out)).max() > 1e-3
  # Outputs are O(4) after 4 layers: merging (W + ΔW) and the low-rank term round differently.
  assert_close(mos_jax.nnx.merge(scanned)(x), out, rtol=1e-5)

  loss = lambda m: (m(x) ** 2).sum()
  g_scanned = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(scanned)
  g_unrolled = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(unrolled)
  flat_s = {k: v[...] for k, v in nnx.to_flat_state(g_scanned)}
  flat_u = {k: v[...] for k, v in nnx.to_flat_state(g_unrolled)}
  # Map each gradient to its group: scanned pools sit on the root, unrolled ones on layer 0's modules.
  s_names = mos_jax.nnx.adapter_of(scanned)
  for i, name in enumerate(scanned.names):
    leaf = name.split("/")[-1]
    for f in ("a", "b"):
      got = flat_s[("pools", i, f)]
      want = next(v for k, v in flat_u.items() if k[-1] == f and leaf in k)
      assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, f)
  assert s_names.spec == adapter.spec


def test_scanned_nnx_trains_with_nnx_optimizer():
  x = jax.random.normal(jax.random.key(0), (4, 3, 16))
  scanned = mos_jax.nnx.adapt(Scanned(0, nnx.Rngs(0)), mos_jax.MoSConfig(
      rank=4, equivalent_rank=1, shards_per_vector=2, target_modules=NAMES, stacked_modules=NAMES))
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  before = [np.asarray(v) for v in jax.tree_util.tree_leaves(nnx.state(scanned, base))]
  optimizer = nnx.Optimizer(scanned, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: ((m(x) - 1.0) ** 2).mean(),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(scanned, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]
  after = jax.tree_util.tree_leaves(nnx.state(scanned, base))
  assert all(np.array_equal(a, b) for a, b in zip(before, after))
