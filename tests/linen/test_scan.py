"""Linen models that nn.scan their layers: MoS through factors attached beside the stacked kernels.

Oracle: the scanned model against the same weights unrolled (one module per layer) with the same
routing and pools: equal outputs and equal pool gradients, layer axis 0 and 1, private shards, l > 1.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mos_jax
from oracles.helpers import assert_close, random_pools

L = 4
NAMES = ("q", "up", "down")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(nn.Dense(24, name="up")(nn.Dense(16, name="q")(x)))
    return x + nn.Dense(16, name="down")(h), None


class Scanned(nn.Module):
  axis: int

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
    return stack(name="layers")(x, None)[0]


class Layers(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x = Block(name=str(i))(x, None)[0]
    return x


class Unrolled(nn.Module):
  """The same blocks, one module per layer: params under ``layers/<i>/...``."""

  @nn.compact
  def __call__(self, x):
    return Layers(name="layers")(x)


def unrolled_params(scanned, axis):
  """The scanned weights as per-layer params under ``layers/<i>/...`` (the unrolled model's tree)."""
  return {"layers": {str(i): {name: {k: jnp.take(v, i, axis=axis) for k, v in leaves.items()}
                              for name, leaves in scanned["layers"].items()} for i in range(L)}}


def apply_unrolled(params, x):
  return Unrolled().apply({"params": params}, x)


def same_spec(scanned_adapter, unrolled_adapter):
  """The unrolled adapter with the scanned one's index arrays and pools, group by group."""
  by_leaf = {g.name.split("/")[-1]: g.name for g in scanned_adapter.groups}
  index_a = {g.name: scanned_adapter.spec.index_a[by_leaf[g.name.split("/")[-1]]] for g in unrolled_adapter.groups}
  index_b = {g.name: scanned_adapter.spec.index_b[by_leaf[g.name.split("/")[-1]]] for g in unrolled_adapter.groups}
  spec = mos_jax.core.AdapterSpec(config=unrolled_adapter.config, groups=unrolled_adapter.groups,
                                  index_a=index_a, index_b=index_b)
  pools = {g.name: scanned_adapter.pools[by_leaf[g.name.split("/")[-1]]] for g in unrolled_adapter.groups}
  return mos_jax.Adapter(pools=pools, spec=spec)


@pytest.mark.parametrize("axis", [0, 1])
def test_scanned_equals_unrolled_outputs_and_pool_gradients(axis):
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  model = Scanned(axis)
  params = model.init(jax.random.key(1), x)["params"]
  assert params["layers"]["q"]["kernel"].shape == ((L, 16, 16) if axis == 0 else (16, L, 16))
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=NAMES)
  scanned = mos_jax.adapt(params, dataclasses.replace(config, stacked_modules=NAMES, layer_axis=axis))
  assert all(g.stacked and g.num_layers == L and g.layer_axis == axis for g in scanned.groups)
  # Small random pools (B included): a clear adapter effect that does not blow up through 4 layers.
  scanned = scanned.replace(pools=jax.tree_util.tree_map(lambda p: 0.1 * p, random_pools(scanned.pools, seed=2)))
  flat = unrolled_params(params, axis)
  unrolled = same_spec(scanned, mos_jax.adapt(flat, config))

  def scanned_loss(adapter):
    with mos_jax.linen.inject(adapter):
      return (model.apply({"params": mos_jax.linen.with_factors(params, adapter)}, x) ** 2).sum()

  def unrolled_loss(adapter):
    with mos_jax.linen.inject(adapter):
      return (apply_unrolled(flat, x) ** 2).sum()

  def scanned_out(adapter):
    with mos_jax.linen.inject(adapter):
      return model.apply({"params": mos_jax.linen.with_factors(params, adapter)}, x)

  def unrolled_out(adapter):
    with mos_jax.linen.inject(adapter):
      return apply_unrolled(flat, x)

  # Jitted: eager injection through a 4-layer scan costs seconds per call.
  out_scanned, out_unrolled = jax.jit(scanned_out)(scanned), jax.jit(unrolled_out)(unrolled)
  assert_close(out_scanned, out_unrolled, rtol=1e-5)
  assert np.abs(np.asarray(out_scanned) - np.asarray(model.apply({"params": params}, x))).max() > 1e-3
  # The merged stack (ΔW in the kernel's own layout, layer axis included) gives the same outputs.
  assert_close(model.apply({"params": mos_jax.merge(params, scanned)}, x), out_scanned, rtol=1e-5)
  g_scanned, g_unrolled = jax.jit(jax.grad(scanned_loss))(scanned), jax.jit(jax.grad(unrolled_loss))(unrolled)
  by_leaf = {g.name.split("/")[-1]: g.name for g in unrolled.groups}
  for g in scanned.groups:
    for f in ("A", "B"):
      got, want = np.asarray(g_scanned.pools[g.name][f]), np.asarray(g_unrolled.pools[by_leaf[g.name.split("/")[-1]]][f])
      assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (g.name, f)


def test_wrong_stack_declarations_are_refused_at_adapt():
  """Issue 20 (unclear errors): a wrong layer_axis or stacked_modules failed later, in the scan, not at adapt."""
  x = jnp.ones((1, 2, 16))
  model = Scanned(0)
  params = model.init(jax.random.key(1), x)["params"]
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: model.apply({"params": p}, v), params, x)
  config = mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q"], stacked_modules=["q"])
  (g,) = mos_jax.adapt(params, config, layouts=layouts).groups
  assert (g.num_layers, g.layer_axis, g.kernel_shape) == (L, 0, (16, 16))
  with pytest.raises(ValueError, match=r"declared stacked with layer_axis=1, leaving \(4, 16\) per layer, but its "
                                       r"module applies a \(16, 16\) kernel: its layer axis is 0, set layer_axis=0"):
    mos_jax.adapt(params, dataclasses.replace(config, layer_axis=1), layouts=layouts)
  with pytest.raises(ValueError, match=r"'layers/q' \(4, 16, 16\) has one more axis than its module applies "
                                       r"\(\(16, 16\)\): it is a stack of layers.*stacked_modules and layer_axis=0"):
    mos_jax.adapt(params, dataclasses.replace(config, stacked_modules=None), layouts=layouts)
  # Siblings of one scan must agree on the layer count: a wrong axis shows without the model, too.
  with pytest.raises(ValueError, match=r"under 'layers' run in one scan.*Along axis 0 they agree: set layer_axis=0"):
    mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=NAMES, stacked_modules=NAMES,
                                            layer_axis=1))


def test_scanned_model_trains_with_make_train_step():
  x = jax.random.normal(jax.random.key(0), (4, 3, 16))
  model = Scanned(0)
  params = model.init(jax.random.key(1), x)["params"]
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, target_modules=NAMES,
                                                    stacked_modules=NAMES, dropout=0.1))
  optimizer = optax.adam(1e-2)
  step = mos_jax.linen.make_train_step(lambda p, b: ((model.apply({"params": p}, b) - 1.0) ** 2).mean(), optimizer)
  opt_state = optimizer.init(adapter)
  losses = []
  for i in range(5):
    adapter, opt_state, loss = step(adapter, opt_state, params, x, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_scanned_model_without_attached_factors_is_refused():
  x = jnp.ones((1, 2, 16))
  model = Scanned(0)
  params = model.init(jax.random.key(1), x)["params"]
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=NAMES,
                                                    stacked_modules=NAMES))
  with pytest.raises(ValueError, match="call the scanned model with mos_jax.linen.with_factors"):
    with mos_jax.linen.inject(adapter):
      model.apply({"params": params}, x)
  with pytest.raises(ValueError, match="with_factors"):
    with mos_jax.linen.inject_multi(mos_jax.core.stack_adapters([adapter]), jnp.zeros((1,), jnp.int32)):
      model.apply({"params": params}, x)


def test_serving_many_adapters_on_a_scanned_model_equals_each_alone():
  x = jax.random.normal(jax.random.key(0), (3, 2, 16))
  model = Scanned(1)
  params = model.init(jax.random.key(1), x)["params"]
  adapters = []
  for seed in range(2):
    a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=NAMES,
                                                stacked_modules=NAMES, layer_axis=1, seed=seed, alpha=8.0 + seed))
    adapters.append(a.replace(pools=jax.tree_util.tree_map(lambda p: 0.1 * p, random_pools(a.pools, seed=seed))))
  stack = mos_jax.core.stack_adapters(adapters)
  ids = jnp.array([1, -1, 0])

  @jax.jit
  def serve(stack, ids):
    with mos_jax.linen.inject_multi(stack, ids):
      return model.apply({"params": mos_jax.linen.with_factors(params, stack)}, x)

  out = serve(stack, ids)
  for row, k in enumerate([1, -1, 0]):
    if k < 0:
      alone = model.apply({"params": params}, x[row:row + 1])
    else:
      with mos_jax.linen.inject(adapters[k]):
        alone = model.apply({"params": mos_jax.linen.with_factors(params, adapters[k])}, x[row:row + 1])
    assert_close(out[row:row + 1], alone, rtol=1e-5)


def test_stacked_peft_export_names_each_layer(tmp_path):
  x = jnp.ones((1, 2, 16))
  model = Scanned(1)
  params = model.init(jax.random.key(1), x)["params"]
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=NAMES,
                                                    stacked_modules=NAMES, layer_axis=1))
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  with pytest.raises(NotImplementedError, match="stacked"):
    mos_jax.export_peft(tmp_path / "no_names", adapter)
  names = [(r"layers/(\w+)", (r"model.layers.{layer}.\1",))]
  factors, scale = mos_jax.formats.load_peft_factors(mos_jax.export_peft(tmp_path / "p", adapter, names=names))
  assert len(factors) == L * len(NAMES)
  merged = mos_jax.merge(params, adapter)
  for i in range(L):
    for name in NAMES:
      a, b = factors[f"model/layers/{i}/{name}"]
      delta = np.asarray(merged["layers"][name]["kernel"][:, i] - params["layers"][name]["kernel"][:, i])
      assert_close(scale * (b @ a).T, delta, rtol=1e-4)


def test_stacked_adapter_round_trips_through_orbax_and_the_native_file(tmp_path):
  x = jnp.ones((1, 2, 16))
  params = Scanned(1).init(jax.random.key(1), x)["params"]
  config = mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=NAMES, stacked_modules=NAMES, layer_axis=1)
  adapter = mos_jax.adapt(params, config)
  trained = adapter.replace(pools=random_pools(adapter.pools, seed=5))
  ident = {"adapter": mos_jax.train.adapter_identity(trained, base_params=params)}
  with mos_jax.TrainCheckpointer(tmp_path / "ckpt", identity=ident, async_save=False) as ckpt:
    ckpt.save(3, {"adapter": trained}, force=True)
    ckpt.wait()
    restored = ckpt.restore({"adapter": adapter}).state["adapter"]
  assert restored.spec == trained.spec
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.pools, trained.pools)
  loaded = mos_jax.load_adapter(mos_jax.save_adapter(tmp_path / "a.safetensors", trained), params=params)
  np.testing.assert_array_equal(mos_jax.merge(params, loaded)["layers"]["q"]["kernel"],
                                mos_jax.merge(params, trained)["layers"]["q"]["kernel"])
