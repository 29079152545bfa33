import jax.numpy as jnp
import pytest
from flax.core import freeze

from mos_jax import MoSConfig, dry_run
from mos_jax.core import BERT_TARGETS, find_groups
from oracles.helpers import layered_params

CFG = MoSConfig(rank=2, equivalent_rank=1)


def test_llama_layout_groups_by_type(tiny_llama):
  groups = {g.name: g for g in find_groups(tiny_llama.params, CFG)}
  assert set(groups) == {f"model/layers/*/{m}" for m in (
      "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
      "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
  q, k, down = (groups[f"model/layers/*/{m}"] for m in ("self_attn/q_proj", "self_attn/k_proj", "mlp/down_proj"))
  assert q.paths == tuple(f"model/layers/{i}/self_attn/q_proj" for i in range(4))
  assert (q.num_layers, q.d_in, q.d_out) == (4, 32, 32)
  assert (k.d_in, k.d_out) == (32, 16)  # GQA: narrower key projection
  assert (down.d_in, down.d_out) == (48, 32)
  assert "lm_head" not in str(groups)


def test_bert_regex_targets(tiny_bert):
  groups = find_groups(tiny_bert.params, MoSConfig(rank=2, equivalent_rank=1, target_modules=BERT_TARGETS))
  assert sorted(g.name for g in groups) == sorted(f"encoder/layer/*/{m}" for m in (
      "attention/self/query", "attention/self/key", "attention/self/value",
      "attention/output/dense", "intermediate/dense", "output/dense"))
  assert all(g.num_layers == 3 for g in groups)


def test_layer_order_is_numeric_not_lexicographic():
  params = layered_params(12, {"proj": (4, 4)})
  (g,) = find_groups(freeze(params), MoSConfig(rank=1, equivalent_rank=1, target_modules=["proj"]))
  assert [p.split("/")[1] for p in g.paths] == [str(i) for i in range(12)]
  assert (g.name, g.layer_of("layers/10/proj")) == ("layers/*/proj", 10)


def test_exclude_and_suffix_matching():
  params = layered_params(2, {"q_proj": (8, 8), "k_proj": (8, 4)})
  cfg = MoSConfig(rank=1, equivalent_rank=1, target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"])
  assert [g.name for g in find_groups(params, cfg)] == ["layers/*/q_proj"]
  # A suffix must end on a path component: "proj" does not match "q_proj".
  with pytest.raises(ValueError, match="No module matched"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["proj"]))


def test_stacked_layout():
  params = layered_params(6, {"q": (8, 16)}, stacked=True)
  (g,) = find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["q"], stacked_modules=["q"],
                                       layer_axis=0))
  assert g.stacked and (g.num_layers, g.d_in, g.d_out) == (6, 8, 16) and g.paths == ("layers/q",)
  assert (g.layer_axis, g.kernel_shape, g.full_shape) == (0, (8, 16), (6, 8, 16))
  # MaxText-style layer axis 1: (d_in, L, d_out).
  (g,) = find_groups({"layers": {"q": {"kernel": jnp.zeros((8, 6, 16))}}},
                     MoSConfig(rank=1, equivalent_rank=1, target_modules=["q"], stacked_modules=r".*/q",
                               layer_axis=1))
  assert g.stacked and (g.num_layers, g.d_in, g.d_out, g.layer_axis) == (6, 8, 16, 1)
  assert g.full_shape == (8, 6, 16)


def test_undeclared_3d_kernel_is_not_taken_for_a_stack():
  """A kernel's rank alone never makes it a stack of layers: it must be declared."""
  params = layered_params(6, {"q": (8, 16)}, stacked=True)
  with pytest.raises(ValueError, match=r"'layers/q' has shape \(6, 8, 16\).*only 2-D.*stacked_modules"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["q"]))
  with pytest.raises(ValueError, match="too few dims for a layer axis"):
    find_groups(layered_params(2, {"q": (8, 16)}),
                MoSConfig(rank=1, equivalent_rank=1, target_modules=["q"], stacked_modules=["q"], layer_axis=1))


def test_no_match_lists_available_kernels(tiny_llama):
  with pytest.raises(ValueError, match=r"No module matched.*model/layers/0/self_attn/q_proj"):
    find_groups(tiny_llama.params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["query"]))


def test_inconsistent_shapes_within_type():
  params = layered_params(2, {"proj": (8, 8)})
  params["layers"]["1"]["proj"]["kernel"] = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match="must share one kernel shape"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["proj"]))


def test_kernel_of_wrong_rank():
  params = {"layers": {"0": {"proj": {"kernel": jnp.zeros((2, 3, 4, 5))}}}}
  with pytest.raises(ValueError, match="only 2-D"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["proj"]))


def test_dry_run_reports_matches_pools_and_counts(tiny_llama):
  cfg = MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2)
  text = dry_run(tiny_llama.params, cfg)
  assert "matched 28 modules" in text
  assert "model/layers/3/mlp/down_proj" in text
  # q_proj pool: N = r_e·L·l = 8 shards of length 32/2.
  assert "(8, 16)" in text
  # r_e·Σ L(d_in+d_out): q,o 64; k,v 48; gate,up,down 80 -> 4·(2·64+2·48+3·80) = 1856.
  assert "trainable params: 1,856" in text
