import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mos_jax import MoSConfig, adapt, assemble, merge
from mos_jax.core import layer_factors, trainable_count
from oracles.helpers import assert_close, layered_params, random_pools
from oracles.reference import assemble_layer, lora_forward

GQA_SHAPES = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "down_proj": (24, 16)}


@st.composite
def cases(draw):
  num_layers = draw(st.integers(1, 5))
  r_e = draw(st.integers(1, 3))
  r_p = draw(st.integers(0, r_e))
  l = draw(st.sampled_from([1, 2, 4, 8]))
  r = r_e if r_p == r_e else draw(st.integers(max(1, r_p), r_p + (r_e - r_p) * num_layers))
  cfg = MoSConfig(rank=r, equivalent_rank=r_e, private_rank=r_p, shards_per_vector=l,
                  target_modules=list(GQA_SHAPES), seed=draw(st.integers(0, 99)),
                  subset_selection=draw(st.booleans()), pair_dissociation=draw(st.booleans()),
                  alpha=draw(st.sampled_from([1.0, 16.0])))
  return cfg, num_layers


@settings(max_examples=40, deadline=None)
@given(cases())
def test_assembly_matches_loop_reference(case):
  cfg, num_layers = case
  adapter = adapt(layered_params(num_layers, GQA_SHAPES), cfg)
  pools = random_pools(adapter.pools)
  factors = assemble(adapter.replace(pools=pools))
  for g in adapter.groups:
    p_a, p_b = np.asarray(pools[g.name]["A"]), np.asarray(pools[g.name]["B"])
    assert factors[g.name]["A"].shape == (num_layers, cfg.rank, g.d_in)
    assert factors[g.name]["B"].shape == (num_layers, g.d_out, cfg.rank)
    for i in range(num_layers):
      a_ref, b_ref = assemble_layer(p_a, p_b, adapter.spec.index_a[g.name][i],
                                    adapter.spec.index_b[g.name][i], cfg.rank, cfg.shards_per_vector)
      np.testing.assert_array_equal(np.asarray(factors[g.name]["A"][i]), a_ref)
      np.testing.assert_array_equal(np.asarray(factors[g.name]["B"][i]), b_ref)
  # r_e · Σ_types L·(d_in + d_out), whatever r, r_p, l.
  expected = cfg.equivalent_rank * num_layers * sum(a + b for a, b in GQA_SHAPES.values())
  assert trainable_count(adapter.config, adapter.groups) == expected
  assert sum(x.size for x in jax.tree_util.tree_leaves(adapter.pools)) == expected


def test_assemble_under_jit_equals_eager():
  adapter = adapt(layered_params(3, GQA_SHAPES), MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                                                           private_rank=1, target_modules=list(GQA_SHAPES)))
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  jitted = jax.jit(assemble)(adapter)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jitted, assemble(adapter))


def test_lora_config_is_exactly_lora():
  rank, num_layers = 4, 3
  params = layered_params(num_layers, GQA_SHAPES)
  adapter = adapt(params, MoSConfig.lora(rank, alpha=8.0, target_modules=list(GQA_SHAPES), shards_per_vector=1))
  # Same parameter count as LoRA: r · L · (d_in + d_out) per type.
  lora_count = rank * num_layers * sum(a + b for a, b in GQA_SHAPES.values())
  assert trainable_count(adapter.config, adapter.groups) == lora_count
  pools = random_pools(adapter.pools, seed=1)
  views = layer_factors(adapter.replace(pools=pools))
  x = np.random.default_rng(2).normal(size=(5, 16)).astype(np.float32)
  w = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
  for i in range(num_layers):
    # LoRA's own A_i, B_i are layer i's private block of the pool, in order.
    p_a = np.asarray(pools["layers/*/k_proj"]["A"])[i * rank:(i + 1) * rank]
    p_b = np.asarray(pools["layers/*/k_proj"]["B"])[i * rank:(i + 1) * rank]
    a_lora, b_lora = p_a, p_b.T
    a, b = views[f"layers/{i}/k_proj"]
    np.testing.assert_array_equal(np.asarray(a), a_lora)
    np.testing.assert_array_equal(np.asarray(b), b_lora)
    ours = x @ w + 2.0 * np.asarray(jnp.einsum("ni,ri,or->no", x, a, b))
    assert_close(ours, lora_forward(x, w, a_lora, b_lora, 2.0), rtol=1e-5)


def test_lora_with_shards_is_still_lora():
  """With r = r_e = r_p any l is LoRA: each layer's private block, reshaped."""
  adapter = adapt(layered_params(2, GQA_SHAPES), MoSConfig(rank=2, equivalent_rank=2, private_rank=2,
                                                           shards_per_vector=4, target_modules=["q_proj"]))
  pools = random_pools(adapter.pools)
  a = assemble(adapter.replace(pools=pools))["layers/*/q_proj"]["A"]
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(pools["layers/*/q_proj"]["A"])[8:16].reshape(2, 16))


def test_pure_sharing_gives_identical_factors_in_every_layer():
  cfg = MoSConfig.pure_sharing(2, num_layers=4, target_modules=list(GQA_SHAPES))
  adapter = adapt(layered_params(4, GQA_SHAPES), cfg)
  pools = random_pools(adapter.pools)
  for name, f in assemble(adapter.replace(pools=pools)).items():
    for i in range(1, 4):
      np.testing.assert_array_equal(np.asarray(f["A"][i]), np.asarray(f["A"][0]))
      np.testing.assert_array_equal(np.asarray(f["B"][i]), np.asarray(f["B"][0]))
    # The whole pool is used: rank r_e·L = 8 built from all 8 shards.
    np.testing.assert_array_equal(np.asarray(f["A"][0]), np.asarray(pools[name]["A"]))


def test_initialisation_follows_the_authors():
  adapter = adapt(layered_params(4, GQA_SHAPES), MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                                                           target_modules=["down_proj"]))
  p_a, p_b = adapter.pools["layers/*/down_proj"]["A"], adapter.pools["layers/*/down_proj"]["B"]
  assert p_a.dtype == jnp.float32 and p_a.shape == (16, 12)
  bound = 1 / np.sqrt(24)  # fan-in is the full d_in, not the shard length
  assert float(jnp.abs(p_a).max()) <= bound and float(jnp.abs(p_a).max()) > 0.8 * bound
  assert not jnp.any(p_b)
  half = adapt(layered_params(4, GQA_SHAPES), MoSConfig(rank=4, equivalent_rank=2, target_modules=["down_proj"],
                                                        pool_dtype="bfloat16"))
  assert half.pools["layers/*/down_proj"]["A"].dtype == jnp.bfloat16


def test_gradient_is_scatter_add_into_pools():
  adapter = adapt(layered_params(3, GQA_SHAPES), MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2,
                                                           target_modules=["q_proj"]))
  routing = adapter.spec
  grads = jax.grad(lambda a: assemble(a)["layers/*/q_proj"]["A"].sum())(adapter)
  # The gradient wrt an adapter is an adapter: its leaves are the pools' gradients.
  assert type(grads) is type(adapter) and grads.spec == routing
  counts = np.bincount(routing.index_a["layers/*/q_proj"].ravel(), minlength=6)
  np.testing.assert_array_equal(np.asarray(grads.pools["layers/*/q_proj"]["A"]), np.repeat(counts[:, None], 8, 1))
  assert not jnp.any(grads.pools["layers/*/q_proj"]["B"])


@pytest.mark.parametrize("mutate, message", [
    (lambda p: {k: v for k, v in list(p.items())[1:]}, "missing groups"),
    (lambda p: {**p, "extra": p[next(iter(p))]}, "unexpected"),
    (lambda p: {k: {"A": v["A"]} for k, v in p.items()}, r"must be \{'A': P_A, 'B': P_B\}"),
    (lambda p: {k: {"A": v["A"][:-1], "B": v["B"]} for k, v in p.items()}, "has shape"),
    (lambda p: {k: {"A": v["A"].astype(jnp.int32), "B": v["B"]} for k, v in p.items()}, "floating point"),
    (lambda p: list(p.values()), "Expected pools as a dict"),
])
def test_wrong_pytree_passed_to_assemble(mutate, message):
  adapter = adapt(layered_params(2, GQA_SHAPES), MoSConfig(rank=2, equivalent_rank=1, target_modules=list(GQA_SHAPES)))
  # Refused when put into an adapter ...
  with pytest.raises(ValueError, match=message):
    adapter.replace(pools=mutate(adapter.pools))
  # ... and by assemble itself, should an adapter hold them anyway (built without the check).
  with pytest.raises(ValueError, match=message):
    assemble(dataclasses.replace(adapter, pools=mutate(adapter.pools)))


def pool_shapes(adapter):
  return {name: {f: tuple(p.shape) for f, p in pair.items()} for name, pair in adapter.pools.items()}


def test_pool_shapes():
  adapter = adapt(layered_params(3, GQA_SHAPES), MoSConfig(rank=4, equivalent_rank=2, private_rank=1,
                                                           shards_per_vector=4, target_modules=["k_proj"]))
  assert pool_shapes(adapter) == {"layers/*/k_proj": {"A": (24, 4), "B": (24, 2)}}


def test_declared_stacked_group_assembles_and_merges_like_per_layer_kernels():
  """A declared stack (L, d_in, d_out) gets layer i's factors of the equivalent per-layer group."""
  cfg = MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=["q_proj"])
  per_layer = adapt(layered_params(3, GQA_SHAPES), cfg)
  stacked_params = layered_params(3, {"q_proj": (16, 16)}, stacked=True)
  stacked_params["layers"]["q_proj"]["kernel"] = jnp.asarray(
      np.random.default_rng(5).normal(size=(3, 16, 16)), jnp.float32)
  stacked = adapt(stacked_params, dataclasses.replace(cfg, stacked_modules=["q_proj"], layer_axis=0))
  (g,) = stacked.groups
  assert g.stacked and g.paths == ("layers/q_proj",) and g.num_layers == 3
  # The same pool shapes as the per-layer group of three (16, 16) kernels.
  assert pool_shapes(stacked)[g.name] == pool_shapes(per_layer)["layers/*/q_proj"]
  stacked = stacked.replace(pools=random_pools(stacked.pools))
  p_a, p_b = (np.asarray(stacked.pools[g.name][f]) for f in ("A", "B"))
  a, b = layer_factors(stacked)["layers/q_proj"]
  assert a.shape == (3, 4, 16) and b.shape == (3, 16, 4)
  for i in range(3):
    a_ref, b_ref = assemble_layer(p_a, p_b, stacked.spec.index_a[g.name][i], stacked.spec.index_b[g.name][i],
                                  cfg.rank, cfg.shards_per_vector)
    np.testing.assert_array_equal(np.asarray(a[i]), a_ref)
    np.testing.assert_array_equal(np.asarray(b[i]), b_ref)
  merged = np.asarray(merge(stacked_params, stacked)["layers"]["q_proj"]["kernel"])
  base = np.asarray(stacked_params["layers"]["q_proj"]["kernel"])
  for i in range(3):
    assert_close(merged[i], base[i] + cfg.scale * np.asarray(a[i]).T @ np.asarray(b[i]).T, rtol=1e-5)
  # Layer axis 1 (MaxText's (d_in, L, d_out)): the same pools merge into column i of the stack.
  moved = {"layers": {"q_proj": {"kernel": jnp.moveaxis(stacked_params["layers"]["q_proj"]["kernel"], 0, 1)}}}
  axis1 = adapt(moved, dataclasses.replace(stacked.config, layer_axis=1)).replace(pools=stacked.pools)
  np.testing.assert_array_equal(axis1.spec.index_a[g.name], stacked.spec.index_a[g.name])
  merged1 = np.asarray(merge(moved, axis1)["layers"]["q_proj"]["kernel"])
  assert merged1.shape == (16, 3, 16)
  assert_close(np.moveaxis(merged1, 1, 0), merged, rtol=1e-5)
