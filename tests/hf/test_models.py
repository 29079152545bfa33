"""Injected forward vs merged weights on tiny random HF Flax Llama and BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import MoSConfig, adapt, assemble, merge, unmerge
from mos_jax.core import BERT_TARGETS
from mos_jax.linen import inject
from oracles.helpers import assert_close, hf_numerics, random_pools

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 7)), jnp.int32)


def llama_out(model, params):
  return model(IDS, params=params).logits


def bert_out(model, params):
  return model(IDS, params=params).last_hidden_state


MODELS = [
    ("tiny_llama", llama_out, MoSConfig(rank=4, equivalent_rank=1, private_rank=0, shards_per_vector=2)),
    ("tiny_llama", llama_out, MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=4)),
    ("tiny_bert", bert_out, MoSConfig(rank=3, equivalent_rank=1, shards_per_vector=2, target_modules=BERT_TARGETS)),
]


def rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("fixture, out, cfg", MODELS)
def test_injected_equals_merged_and_init_equals_base(fixture, out, cfg, request):
  model = request.getfixturevalue(fixture)
  adapter = adapt(model.params, cfg)

  @jax.jit
  def adapted(adapter, params):
    with hf_numerics(), inject(adapter):
      return out(model, params)

  with hf_numerics():
    base = out(model, model.params)
    # B = 0 at init: the adapter adds exact zeros. Op by op (no XLA fusion to reorder
    # the float arithmetic around the extra add) the outputs are equal bit for bit.
    with inject(adapter):
      np.testing.assert_array_equal(np.asarray(out(model, model.params)), np.asarray(base))
    assert rel_err(adapted(adapter, model.params), base) < 1e-6
    # Small enough that attention logits stay moderate: large random deltas make the
    # softmax ill-conditioned and float32 round-off, not the adapter, dominates.
    trained = adapter.replace(pools=jax.tree_util.tree_map(lambda x: 0.05 * x, random_pools(adapter.pools)))
    injected = adapted(trained, model.params)
    merged = out(model, merge(model.params, trained))
  assert rel_err(injected, base) > 1e-3  # the adapter does something
  assert rel_err(injected, merged) < 1e-5


def test_merge_touches_only_targets_and_unmerge_restores(tiny_llama):
  cfg = MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, target_modules=["q_proj", "down_proj"])
  adapter = adapt(tiny_llama.params, cfg)
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  factors = assemble(adapter)
  merged = merge(tiny_llama.params, adapter)
  layers = merged["model"]["layers"]
  base = tiny_llama.params["model"]["layers"]
  a, b = factors["model/layers/*/self_attn/q_proj"]["A"][2], factors["model/layers/*/self_attn/q_proj"]["B"][2]
  assert_close(np.asarray(layers["2"]["self_attn"]["q_proj"]["kernel"]), np.asarray(base["2"]["self_attn"]["q_proj"]["kernel"])
                             + cfg.scale * np.asarray(a).T @ np.asarray(b).T, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(layers["2"]["self_attn"]["k_proj"]["kernel"]),
                                np.asarray(base["2"]["self_attn"]["k_proj"]["kernel"]))
  restored = unmerge(merged, adapter)
  # W + ΔW - ΔW rounds at the scale of the merged kernel, not of W: compare against that scale.
  jax.tree_util.tree_map(
      lambda x, y, m: np.testing.assert_array_less(np.abs(np.asarray(x) - np.asarray(y)).max(),
                                                   1e-5 * max(np.abs(np.asarray(m)).max(), 1e-30)),
      restored, tiny_llama.params, merged)


def test_merge_keeps_kernel_dtype(tiny_llama):
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tiny_llama.params)
  adapter = adapt(params, MoSConfig(rank=2, equivalent_rank=1))
  merged = merge(params, adapter.replace(pools=random_pools(adapter.pools)))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))


def test_bf16_base_with_float32_pools(tiny_llama):
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tiny_llama.params)
  adapter = adapt(params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(adapter.pools))
  pools = jax.tree_util.tree_map(lambda x: 0.3 * x, random_pools(adapter.pools))
  with hf_numerics(), inject(adapter.replace(pools=pools)):
    out = llama_out(tiny_llama, params)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_dropout_is_active_only_with_a_key(tiny_llama):
  adapter = adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, dropout=0.5))
  adapter = adapter.replace(pools=random_pools(adapter.pools))

  def forward(key):
    with hf_numerics(), inject(adapter, dropout_rng=key):
      return llama_out(tiny_llama, tiny_llama.params)

  with_key, without_key = jax.jit(forward), jax.jit(lambda: forward(None))  # eager injection costs seconds a call
  run = lambda key: without_key() if key is None else with_key(key)
  k = jax.random.key(0)
  np.testing.assert_array_equal(np.asarray(run(k)), np.asarray(run(k)))
  assert rel_err(run(k), run(jax.random.key(1))) > 1e-3
  assert rel_err(run(None), run(k)) > 1e-3


def test_stacked_groups_are_declared_and_must_be_reached():
  params = {"layers": {"q": {"kernel": jnp.zeros((4, 8, 8))}}}
  # A 3-D kernel is not taken for a stack of layers unless declared.
  with pytest.raises(ValueError, match="only 2-D"):
    adapt(params, MoSConfig(rank=2, equivalent_rank=1, target_modules=["q"]))
  adapter = adapt(params, MoSConfig(rank=2, equivalent_rank=1, target_modules=["q"], stacked_modules=["q"],
                                    layer_axis=0))
  # Injection into scanned layers is tested in test_scan_linen.py; a block that calls nothing still fails.
  with pytest.raises(RuntimeError, match="never reached these adapted modules: layers/q"):
    with inject(adapter):
      pass
  merged = merge(params, adapter.replace(pools=random_pools(adapter.pools)))
  assert merged["layers"]["q"]["kernel"].shape == (4, 8, 8) and bool(jnp.any(merged["layers"]["q"]["kernel"]))


def test_merge_and_inject_refuse_another_model(tiny_llama):
  """An adapter only applies to the params it was made for: missing or extra layers are named."""
  params = tiny_llama.params
  cfg = MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"])
  adapter = adapt(params, cfg)
  two_layers = {**params, "model": {**params["model"], "layers": {
      k: v for k, v in params["model"]["layers"].items() if k in ("0", "1")}}}
  for fold in (merge, unmerge):
    with pytest.raises(ValueError, match=r"model/layers/3/self_attn/q_proj: the adapter expects a kernel "
                                         r"\(32, 32\), the params have none"):
      fold(two_layers, adapter)
  small = adapt(two_layers, cfg)
  with pytest.raises(ValueError, match=r"model/layers/2/self_attn/q_proj: the params have a targeted kernel "
                                       r"\(32, 32\) the adapter has no factors for"):
    merge(params, small)
  # Injected, a targeted module without factors is refused when the model calls it ...
  with pytest.raises(ValueError, match=r"'model/layers/2/self_attn/q_proj'.*has no factors"):
    with hf_numerics(), inject(small):
      llama_out(tiny_llama, params)
  # ... and an adapted module the block never called is reported on exit.
  with pytest.raises(RuntimeError, match=r"never reached.*model/layers/0/self_attn/q_proj"):
    with inject(adapter):
      pass
