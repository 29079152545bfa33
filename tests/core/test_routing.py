import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mos_jax import MoSConfig
from mos_jax.core import find_groups, make_spec
from oracles.helpers import layered_params
from oracles.reference import expected_private_block


@st.composite
def configs(draw):
  num_layers = draw(st.integers(1, 6))
  r_e = draw(st.integers(1, 3))
  r_p = draw(st.integers(0, r_e))
  l = draw(st.sampled_from([1, 2, 4]))
  max_r = r_p + (r_e - r_p) * num_layers
  r = r_e if r_p == r_e else draw(st.integers(max(1, r_p), max_r))
  cfg = MoSConfig(rank=r, equivalent_rank=r_e, private_rank=r_p, shards_per_vector=l,
                  target_modules=["proj"], seed=draw(st.integers(0, 2**16)),
                  subset_selection=draw(st.booleans()), pair_dissociation=draw(st.booleans()))
  return cfg, num_layers


def routing_for(cfg, num_layers, d=8):
  return make_spec(cfg, find_groups(layered_params(num_layers, {"proj": (d, d)}), cfg))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_routing_invariants(case):
  cfg, num_layers = case
  routing = routing_for(cfg, num_layers)
  r, r_e, r_p, l = cfg.rank, cfg.equivalent_rank, cfg.private_rank, cfg.shards_per_vector
  public_region = (r_e - r_p) * num_layers * l
  for index in (routing.index_a["layers/*/proj"], routing.index_b["layers/*/proj"]):
    assert index.shape == (num_layers, r * l) and index.dtype == np.int32
    for i, row in enumerate(index):
      public, private = row[: (r - r_p) * l], row[(r - r_p) * l:]
      assert len(set(public.tolist())) == len(public)
      assert ((0 <= public) & (public < public_region)).all()
      assert private.tolist() == expected_private_block(i, r_e, r_p, num_layers, l)
      if not cfg.subset_selection:
        assert public.tolist() == list(range((r - r_p) * l))


def test_dissociation_switch():
  cfg = MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=["proj"])
  on = routing_for(cfg, 4)
  assert not np.array_equal(on.index_a["layers/*/proj"], on.index_b["layers/*/proj"])
  off = routing_for(MoSConfig(**{**cfg.__dict__, "pair_dissociation": False}), 4)
  np.testing.assert_array_equal(off.index_a["layers/*/proj"], off.index_b["layers/*/proj"])


def test_subset_selection_gives_each_layer_its_own_draw():
  cfg = MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=["proj"])
  index = routing_for(cfg, 4).index_a["layers/*/proj"]
  assert len({tuple(row) for row in index}) == 4


def test_same_seed_same_routing_other_seed_differs():
  cfg = MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=["proj"], seed=3)
  a, b = routing_for(cfg, 4), routing_for(cfg, 4)
  c = routing_for(MoSConfig(**{**cfg.__dict__, "seed": 4}), 4)
  np.testing.assert_array_equal(a.index_a["layers/*/proj"], b.index_a["layers/*/proj"])
  np.testing.assert_array_equal(a.index_b["layers/*/proj"], b.index_b["layers/*/proj"])
  assert not np.array_equal(a.index_a["layers/*/proj"], c.index_a["layers/*/proj"])


def test_routing_is_read_only():
  routing = routing_for(MoSConfig(rank=2, equivalent_rank=1, target_modules=["proj"]), 2)
  with pytest.raises(ValueError):
    routing.index_a["layers/*/proj"][0, 0] = 1


def test_not_divisible_by_shards():
  cfg = MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=4, target_modules=["proj"])
  with pytest.raises(ValueError, match=r"d_in=6.*not divisible by shards_per_vector \(l=4\).*l in \[1, 2\]"):
    make_spec(cfg, find_groups(layered_params(2, {"proj": (6, 8)}), cfg))


def test_public_region_too_small():
  cfg = MoSConfig(rank=8, equivalent_rank=2, private_rank=1, target_modules=["proj"])
  with pytest.raises(ValueError, match=r"draws \(r - r_p\)·l = \(8 - 1\)·1 = 7.*holds only.*= 4.*at most 5"):
    routing_for(cfg, 4)


@pytest.mark.parametrize("bad_id", [8, -1, 1000])
def test_a_spec_with_out_of_range_shard_ids_is_refused_when_it_is_made(bad_id):
  """Issue 20.12: a hand-built spec with an id outside its pool was clipped onto the last shard by merge."""
  import dataclasses
  import jax.numpy as jnp
  import mos_jax
  cfg = MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2, target_modules=["proj"])
  spec = routing_for(cfg, 4)  # N = r_e·L·l = 8 shards per pool
  index_a = {name: np.array(index) for name, index in spec.index_a.items()}
  index_a["layers/*/proj"][1, 3] = bad_id
  with pytest.raises(ValueError, match=rf"index_a\['layers/\*/proj'\] holds 1 shard id\(s\) outside the pool's "
                                       rf"\[0, 8\).*layer 1 position 3: {bad_id}.*make_spec"):
    mos_jax.AdapterSpec(config=cfg, groups=spec.groups, index_a=index_a, index_b=spec.index_b)
  with pytest.raises(ValueError, match="outside the pool"):
    dataclasses.replace(spec, index_a=index_a)
  # A valid hand-built spec keeps its own read-only int32 copy: the caller's array may change, the spec cannot.
  index_a["layers/*/proj"][1, 3] = 7
  built = mos_jax.AdapterSpec(config=cfg, groups=list(spec.groups), index_a=index_a, index_b=spec.index_b)
  index_a["layers/*/proj"][1, 3] = 0
  assert built.index_a["layers/*/proj"][1, 3] == 7 and built.index_a["layers/*/proj"].dtype == np.int32
  assert not built.index_a["layers/*/proj"].flags.writeable and isinstance(built.groups, tuple)
  params = {"layers": {str(i): {"proj": {"kernel": jnp.zeros((8, 8))}} for i in range(4)}}
  merged = mos_jax.merge(params, mos_jax.Adapter(pools=mos_jax.core.adapt(params, cfg).pools, spec=built))
  assert set(merged["layers"]) == set(params["layers"])
