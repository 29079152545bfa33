"""Sharded (pjit) training on 8 CPU devices equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import mos_jax
from mos_jax import MoSConfig
from mos_jax.parallel import (MeshConfig, base_shardings, base_spec, batch_sharding, init_opt_state, make_mesh,
                              pool_shardings)
from oracles.helpers import assert_close, hf_numerics

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(8, 9)), jnp.int32)


def lm_loss(model):
  def loss_fn(params, batch):
    with hf_numerics():
      logits = model(batch[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return loss_fn


def run_steps(step, adapter, opt_state, params, batch, n=3):
  losses = []
  for i in range(n):
    adapter, opt_state, loss = step(adapter, opt_state, params, batch, jax.random.key(i))
    losses.append(float(loss))
  return adapter, losses


@pytest.fixture(scope="module")
def reference(tiny_llama):
  adapter = mos_jax.adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  optimizer = optax.adamw(1e-2)
  step = mos_jax.linen.make_train_step(lm_loss(tiny_llama), optimizer)
  trained = adapter.replace(pools=jax.tree_util.tree_map(jnp.copy, adapter.pools))  # the step donates it
  trained, losses = run_steps(step, trained, optimizer.init(trained), tiny_llama.params, IDS)
  return adapter, optimizer, jax.tree_util.tree_map(np.asarray, trained.pools), losses


@pytest.mark.parametrize("shape, follow_base", [((8, 1, 1), False), ((2, 4, 1), False), ((2, 2, 2), False),
                                                ((2, 2, 2), True)])
def test_sharded_step_matches_single_device(tiny_llama, reference, shape, follow_base):
  adapter, optimizer, ref_pools, ref_losses = reference
  mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
  # fsdp_min_size=0: shard even the tiny model's kernels, so the test exercises FSDP.
  params_sharding = base_shardings(tiny_llama.params, mesh, fsdp_min_size=0)
  pools_sharding = pool_shardings(adapter, mesh, follow_base=follow_base, fsdp_min_size=0)
  params = jax.device_put(tiny_llama.params, params_sharding)
  trained = jax.device_put(adapter.replace(pools=jax.tree_util.tree_map(jnp.copy, adapter.pools)), pools_sharding)
  opt_state, opt_sharding = init_opt_state(optimizer, trained, mesh)
  step = mos_jax.linen.make_train_step(
      lm_loss(tiny_llama), optimizer, trainable_sharding=pools_sharding, opt_state_sharding=opt_sharding,
      params_sharding=params_sharding, batch_sharding=batch_sharding(mesh))
  batch = jax.device_put(IDS, batch_sharding(mesh))
  trained, losses = run_steps(step, trained, opt_state, params, batch)
  assert trained.spec == adapter.spec
  assert_close(losses, ref_losses, rtol=1e-5)
  for name, entry in trained.pools.items():
    for factor, value in entry.items():
      ref = ref_pools[name][factor]
      assert value.sharding == pools_sharding.pools[name][factor]
      assert np.linalg.norm(np.asarray(value) - ref) <= 1e-5 * np.linalg.norm(ref), (name, factor)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, s: x.sharding == s, params, params_sharding))


def test_partition_rules(tiny_llama):
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  layer = base_shardings(tiny_llama.params, mesh, fsdp_min_size=0)["model"]["layers"]["0"]
  spec = lambda module: layer[module[0]][module[1]]["kernel"].spec
  assert spec(("self_attn", "q_proj")) == P("fsdp", "tensor")  # column parallel: (d_in, d_out/tensor)
  assert spec(("self_attn", "k_proj")) == P("fsdp", "tensor")
  assert spec(("self_attn", "o_proj")) == P("tensor", "fsdp")  # row parallel: (d_in/tensor, d_out)
  assert spec(("mlp", "down_proj")) == P("tensor", "fsdp")
  assert layer["input_layernorm"]["weight"].spec == P("fsdp")
  # By default only leaves of >= 2**14 elements are FSDP-sharded; these are all smaller.
  default = base_shardings(tiny_llama.params, mesh)["model"]["layers"]["0"]
  assert default["self_attn"]["q_proj"]["kernel"].spec == P(None, "tensor")
  assert default["input_layernorm"]["weight"].spec == P(None)
  # A dim that the axis does not divide stays whole.
  mesh8 = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
  assert base_spec("m/layers/0/k_proj/kernel", (32, 12), mesh8) == P(None, None)
  assert base_spec("m/layers/0/q_proj/kernel", (32, 16), mesh8) == P(None, "tensor")
  # A kernel of another rank may be einsum-style or a stack: its rank does not say which dim is the
  # output, so no tensor rule applies to it (only FSDP, from fsdp_min_size elements).
  assert base_spec("m/layers/q_proj/kernel", (4, 32, 16), mesh8) == P(None, None, None)
  # A declared stack keeps its layer axis whole and gets one layer's rules (axis 0 or 1).
  assert base_spec("m/layers/q_proj/kernel", (4, 32, 16), mesh8, layer_axis=0) == P(None, None, "tensor")
  assert base_spec("m/layers/q_proj/kernel", (32, 4, 16), mesh8, layer_axis=1) == P(None, None, "tensor")
  fsdp8 = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  assert base_spec("m/layers/q_proj/kernel", (16, 8, 8), fsdp8, fsdp_min_size=0) == P("fsdp", None, None)
  assert base_spec("m/layers/q_proj/kernel", (16, 8, 8), fsdp8, fsdp_min_size=0, layer_axis=0) == P(None, "fsdp", None)
  stacked = {"m": {"layers": {"q_proj": {"kernel": jnp.zeros((4, 32, 16))}}}}
  config = MoSConfig(rank=2, equivalent_rank=1, target_modules=("q_proj",), stacked_modules=("q_proj",))
  assert base_shardings(stacked, mesh8, config=config)["m"]["layers"]["q_proj"]["kernel"].spec == P(None, None, "tensor")


def test_pool_shardings_follow_base(tiny_llama):
  adapter = mos_jax.adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  replicated = pool_shardings(adapter, mesh)
  # An Adapter-shaped tree: same structure (static routing included) as the adapter it places.
  assert isinstance(replicated, mos_jax.Adapter) and replicated.spec == adapter.spec
  assert jax.tree_util.tree_structure(replicated) == jax.tree_util.tree_structure(adapter)
  assert all(s.spec == P() for g in replicated.pools.values() for s in g.values())
  placed = jax.device_put(adapter, replicated)
  assert all(x.sharding == s for x, s in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(replicated)))
  follow = pool_shardings(adapter, mesh, follow_base=True, fsdp_min_size=0)
  q = follow.pools["model/layers/*/self_attn/q_proj"]
  assert q["A"].spec == P(None, "fsdp") and q["B"].spec == P(None, "tensor")  # kernel is (fsdp, tensor)
  down = follow.pools["model/layers/*/mlp/down_proj"]
  assert down["A"].spec == P(None, "tensor") and down["B"].spec == P(None, "fsdp")


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=3, fsdp=-1), "not divisible"), (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices"),
])
def test_bad_mesh_configs(config, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(config)


def test_sharded_step_needs_all_four_shardings():
  mesh = make_mesh(MeshConfig(data=8))
  with pytest.raises(ValueError, match="all four shardings"):
    mos_jax.linen.make_train_step(lambda params, batch: 0.0, optax.sgd(0.1), batch_sharding=batch_sharding(mesh))
