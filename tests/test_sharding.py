"""Sharded (pjit) training on 8 CPU devices equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import mos_jax
from conftest import hf_numerics
from mos_jax import MeshConfig, MoSConfig

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(8, 9)), jnp.int32)


def lm_loss(model):
  def loss_fn(params, batch):
    with hf_numerics():
      logits = model(batch[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return loss_fn


def run_steps(model, adapter, step, pools, opt_state, params, batch, n=3):
  losses = []
  for i in range(n):
    pools, opt_state, loss = step(pools, opt_state, params, batch, jax.random.key(i))
    losses.append(float(loss))
  return pools, losses


@pytest.fixture(scope="module")
def reference(tiny_llama):
  adapter = mos_jax.adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  optimizer = optax.adamw(1e-2)
  step = mos_jax.make_train_step(lm_loss(tiny_llama), adapter.routing, optimizer)
  pools = jax.tree_util.tree_map(jnp.copy, adapter.pools)
  pools, losses = run_steps(tiny_llama, adapter, step, pools, optimizer.init(pools), tiny_llama.params, IDS)
  return adapter, optimizer, jax.tree_util.tree_map(np.asarray, pools), losses


@pytest.mark.parametrize("shape, follow_base", [((8, 1, 1), False), ((2, 4, 1), False), ((2, 2, 2), False),
                                                ((2, 2, 2), True)])
def test_sharded_step_matches_single_device(tiny_llama, reference, shape, follow_base):
  adapter, optimizer, ref_pools, ref_losses = reference
  mesh = mos_jax.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
  # fsdp_min_size=0: shard even the tiny model's kernels, so the test exercises FSDP.
  params_sharding = mos_jax.base_shardings(tiny_llama.params, mesh, fsdp_min_size=0)
  pools_sharding = mos_jax.pool_shardings(adapter.routing, mesh, params=tiny_llama.params, follow_base=follow_base,
                                          fsdp_min_size=0)
  params = jax.device_put(tiny_llama.params, params_sharding)
  pools = jax.device_put(jax.tree_util.tree_map(jnp.copy, adapter.pools), pools_sharding)
  opt_state, opt_sharding = mos_jax.init_opt_state(optimizer, pools, mesh)
  step = mos_jax.make_sharded_train_step(
      lm_loss(tiny_llama), adapter.routing, optimizer, params_sharding=params_sharding,
      pools_sharding=pools_sharding, opt_state_sharding=opt_sharding, batch_sharding=mos_jax.batch_sharding(mesh))
  batch = jax.device_put(IDS, mos_jax.batch_sharding(mesh))
  pools, losses = run_steps(tiny_llama, adapter, step, pools, opt_state, params, batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for name, entry in pools.items():
    for factor, value in entry.items():
      ref = ref_pools[name][factor]
      assert value.sharding == pools_sharding[name][factor]
      assert np.linalg.norm(np.asarray(value) - ref) <= 1e-5 * np.linalg.norm(ref), (name, factor)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, s: x.sharding == s, params, params_sharding))


def test_partition_rules(tiny_llama):
  mesh = mos_jax.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  layer = mos_jax.base_shardings(tiny_llama.params, mesh, fsdp_min_size=0)["model"]["layers"]["0"]
  spec = lambda module: layer[module[0]][module[1]]["kernel"].spec
  assert spec(("self_attn", "q_proj")) == P("fsdp", "tensor")  # column parallel: (d_in, d_out/tensor)
  assert spec(("self_attn", "k_proj")) == P("fsdp", "tensor")
  assert spec(("self_attn", "o_proj")) == P("tensor", "fsdp")  # row parallel: (d_in/tensor, d_out)
  assert spec(("mlp", "down_proj")) == P("tensor", "fsdp")
  assert layer["input_layernorm"]["weight"].spec == P("fsdp")
  # By default only leaves of >= 2**14 elements are FSDP-sharded; these are all smaller.
  default = mos_jax.base_shardings(tiny_llama.params, mesh)["model"]["layers"]["0"]
  assert default["self_attn"]["q_proj"]["kernel"].spec == P(None, "tensor")
  assert default["input_layernorm"]["weight"].spec == P(None)
  # A dim that the axis does not divide stays whole.
  mesh8 = mos_jax.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
  assert mos_jax.base_spec("m/layers/0/k_proj/kernel", (32, 12), mesh8) == P(None, None)
  # Stacked (scanned) kernels keep the layer axis whole.
  assert mos_jax.base_spec("m/layers/q_proj/kernel", (4, 32, 16), mesh8) == P(None, None, "tensor")


def test_pool_shardings_follow_base(tiny_llama):
  adapter = mos_jax.adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  mesh = mos_jax.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  replicated = mos_jax.pool_shardings(adapter.routing, mesh)
  assert all(s.spec == P() for g in replicated.values() for s in g.values())
  follow = mos_jax.pool_shardings(adapter.routing, mesh, params=tiny_llama.params, follow_base=True, fsdp_min_size=0)
  q = follow["model/layers/*/self_attn/q_proj"]
  assert q["A"].spec == P(None, "fsdp") and q["B"].spec == P(None, "tensor")  # kernel is (fsdp, tensor)
  down = follow["model/layers/*/mlp/down_proj"]
  assert down["A"].spec == P(None, "tensor") and down["B"].spec == P(None, "fsdp")


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=3, fsdp=-1), "not divisible"), (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices"),
])
def test_bad_mesh_configs(config, message):
  with pytest.raises(ValueError, match=message):
    mos_jax.make_mesh(config)
