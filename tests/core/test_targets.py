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
  with pytest.raises(ValueError, match=r"(?s)No module matched.*'query'.*named: down_proj, gate_proj, k_proj"):
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


GEMMA_LIKE = {"q_einsum": (8, 8), "kv_einsum": (8, 8), "attn_vec_einsum": (8, 8),
              "gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}


def test_every_unmatched_target_name_is_refused_with_the_closest_module_names():
  """Issue 20.8: LLaMA's names on Gemma 3 adapted only the MLP, silently (q/k/v/o_proj matched nothing)."""
  params = layered_params(2, GEMMA_LIKE)
  with pytest.raises(ValueError) as e:
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1))  # the default: LLaMA's seven projections
  message = str(e.value)
  assert "No module matched 4 listed name(s)" in message
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    assert f"target_modules {name!r}: " in message
  assert message.count("\n  - target_modules ") == 4  # only the unmatched names are listed
  assert "'q_proj': closest module names 'q_einsum'" in message  # the unclaimed modules first, not 'up_proj'
  assert "'k_proj': closest module names 'kv_einsum'" in message
  assert "named: attn_vec_einsum, down_proj, gate_proj, kv_einsum, q_einsum, up_proj" in message
  # A misspelling next to correct names is refused too (PEFT accepts it while another name matches).
  with pytest.raises(ValueError, match=r"target_modules 'up_prj': closest module names 'up_proj'"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["gate_proj", "up_prj"]))
  with pytest.raises(ValueError, match=r"exclude_modules 'gate_prj': closest module names 'gate_proj'"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["gate_proj", "up_proj"],
                                  exclude_modules=["gate_prj"]))
  with pytest.raises(ValueError, match=r"must match targeted kernels.*\n  - stacked_modules 'down_proj': closest"):
    find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["gate_proj", "up_proj"],
                                  stacked_modules=["down_proj"]))
  groups = find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["gate_proj", "up_proj"]))
  assert [g.name for g in groups] == ["layers/*/gate_proj", "layers/*/up_proj"]


def test_flax_list_items_are_layer_indices():
  """Issue 20.9: ``layers_0``, ``layers_1`` (Flax's names for a list of submodules) made one group per layer."""
  params = {"model": {f"{name}_{i}": {"attn": {"q": {"kernel": jnp.zeros((8, 8))}}} for i in range(12)}
            for name in ("layers",)}
  (g,) = find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["q"]))
  assert (g.name, g.num_layers) == ("model/layers_*/attn/q", 12)
  assert g.paths == tuple(f"model/layers_{i}/attn/q" for i in range(12))  # numeric order, not layers_1, layers_10
  for name in ("h", "block", "Block"):
    (g,) = find_groups({f"{name}_{i}": {"c_attn": {"kernel": jnp.zeros((8, 8))}} for i in range(3)},
                       MoSConfig(rank=1, equivalent_rank=1, target_modules=["c_attn"]))
    assert (g.name, g.num_layers) == (f"{name}_*/c_attn", 3)
  # The kernel module's own name is a name: Flax calls two different layers of one block Dense_0 and Dense_1.
  params = {f"Block_{i}": {"Dense_0": {"kernel": jnp.zeros((8, 16))}, "Dense_1": {"kernel": jnp.zeros((16, 8))}}
            for i in range(3)}
  groups = find_groups(params, MoSConfig(rank=1, equivalent_rank=1, target_modules=["Dense_0", "Dense_1"]))
  assert [(g.name, g.num_layers) for g in groups] == [("Block_*/Dense_0", 3), ("Block_*/Dense_1", 3)]


@pytest.mark.parametrize("axis", [0, 1])
def test_a_wrong_layer_axis_is_refused_at_adapt(axis):
  """Issue 20 (unclear errors): a wrong layer_axis was accepted and failed later with shape or scan errors."""
  L, d, f = 6, 8, 12
  shapes = {"up": (d, f), "down": (f, d)}
  stacked = {"layers": {"mlp": {name: {"kernel": jnp.zeros(s[:axis] + (L,) + s[axis:])} for name, s in shapes.items()}}}
  good = MoSConfig(rank=1, equivalent_rank=1, target_modules=["up", "down"], stacked_modules=["up", "down"],
                   layer_axis=axis)
  assert {g.num_layers for g in find_groups(stacked, good)} == {L}
  with pytest.raises(ValueError, match=rf"under 'layers/mlp' run in one scan.*layer_axis={1 - axis}.*"
                                       rf"Along axis {axis} they agree: set layer_axis={axis}"):
    find_groups(stacked, MoSConfig(**{**good.__dict__, "layer_axis": 1 - axis}))
