"""Many adapters in one batch of an NNX model: rows against each adapter alone, through Tunix's Sampler.

Oracles: each row of a mixed batch against the same prompt run alone by ``mos_jax.nnx.adapt(model,
adapter)`` (the single-adapter path: MoSLayer and its low-rank term) or by the base model, in a full
forward and in Tunix's prefill + KV-cache decoding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mos_jax
from oracles.helpers import assert_close, random_pools

g3 = pytest.importorskip("tunix.models.gemma3.model")
sampler_lib = pytest.importorskip("tunix.generate.sampler")

from nnx.test_adapt import logits as eager_logits, tiny_gemma3  # noqa: E402

#: Jitted: eager, the first forward of each kind of layer takes seconds (one compilation per operation).
logits = nnx.jit(eager_logits)

CONFIG = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=mos_jax.nnx.GEMMA3_TARGETS)
K = 3


class Tokenizer:
  """Characters to ids 4..63 of the tiny models' vocabulary of 64 (pad 0, eos 1, bos 2)."""

  def encode(self, text, **kw):
    return [4 + ord(c) % 60 for c in text]

  def decode(self, ids, **kw):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 2

  def eos_id(self):
    return 1

  def pad_id(self):
    return 0


@pytest.fixture(scope="module")
def model():
  return tiny_gemma3()


@pytest.fixture(scope="module")
def adapters(model):
  out = []
  for k in range(K):
    config = dataclasses.replace(CONFIG, seed=k, alpha=8.0 + k)  # other routings and scales
    adapter = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(model, config))
    out.append(adapter.replace(pools=random_pools(adapter.pools, seed=k, scale=0.3)))
  return out


@pytest.fixture(scope="module")
def served(model, adapters):
  return mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters(adapters))


def alone(model, adapter):
  return model if adapter is None else mos_jax.nnx.adapt(model, adapter)


def sampler(model):
  cache = sampler_lib.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
  return sampler_lib.Sampler(model, Tokenizer(), cache)


PROMPTS = ["hello", "hi there", "abc", "xyz!", "mixture", "of shards"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 64, size=(6, 7)), jnp.int32)
SAMPLING = {"max_generation_steps": 6, "eos_tokens": [1], "return_logits": True}


@pytest.mark.parametrize("segment_max", [4 * 7, 0], ids=["segmented", "per-row"])
def test_mixed_batch_rows_equal_each_adapter_alone(model, adapters, served, segment_max):
  ids = np.array([2, 0, -1, 1, 0, 2], np.int32)
  mos_jax.nnx.set_adapter_ids(served, mos_jax.core.plan_rows(ids, K, segment_max=segment_max))
  mixed = np.asarray(logits(served, TOKENS))
  base = np.asarray(logits(model, TOKENS))
  for k in range(-1, K):
    rows = np.flatnonzero(ids == k)
    ref = np.asarray(logits(alone(model, adapters[k] if k >= 0 else None), TOKENS[rows]))
    assert_close(mixed[rows], ref, rtol=1e-5)
    if k >= 0:
      assert np.abs(ref - base[rows]).max() > 1e-2 * np.abs(base).max()  # each adapter changes its rows


@pytest.mark.slow  # five samplers (the mixed batch, each adapter alone, the base) compile prefill and decode: ~40 s
def test_generation_through_tunix_sampler_equals_each_adapter_alone(model, adapters, served):
  ids = np.array([0, 2, -1, 1, 1, 0], np.int16)  # any integer dtype
  out = mos_jax.nnx.serve(sampler(served), PROMPTS, ids, **SAMPLING)
  base = sampler(model)(PROMPTS, **SAMPLING)
  changed = 0
  for k in range(-1, K):
    # Each adapter alone on the same batch (same padding): its rows must match the mixed batch's exactly.
    ref = base if k < 0 else sampler(alone(model, adapters[k]))(PROMPTS, **SAMPLING)
    for row in np.flatnonzero(ids == k):
      np.testing.assert_array_equal(out.tokens[row], ref.tokens[row])
      assert_close(out.logits[row], ref.logits[row], rtol=1e-5)
      changed += k >= 0 and not np.array_equal(base.tokens[row], ref.tokens[row])
  assert changed >= 2  # the adapters change what is generated, so a row given the wrong one would fail


def test_bad_ids_are_refused_before_anything_runs(served):
  s = sampler(served)
  for bad in ([0, 3, 1], [-2, 0, 0], [0, 1, 2**40]):
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\).*row"):
      mos_jax.nnx.serve(s, PROMPTS[:3], np.asarray(bad), **SAMPLING)
  with pytest.raises(ValueError, match="1-D integer"):
    mos_jax.nnx.set_adapter_ids(served, np.zeros((3,), np.float32))
  with pytest.raises(ValueError, match="one adapter id per prompt: 3 prompts"):
    mos_jax.nnx.serve(s, PROMPTS[:3], [0, 1], **SAMPLING)
  with pytest.raises(NotImplementedError, match="beam_size"):
    mos_jax.nnx.serve(s, PROMPTS[:3], [0, 1, 2], beam_size=2, **SAMPLING)
  mos_jax.nnx.set_adapter_ids(served, [0, 1])
  with pytest.raises(ValueError, match="not the batch of 2 adapter ids: call mos_jax.nnx.set_adapter_ids"):
    logits(served, TOKENS[:3])


def test_traced_bad_ids_poison_only_their_rows(model, adapters, served):
  graphdef, state = nnx.split(served)

  @jax.jit
  def forward(state, ids):
    m = nnx.merge(graphdef, state)
    mos_jax.nnx.set_adapter_ids(m, mos_jax.core.plan_rows(ids, K))  # traced: per-row gathers, NaN for bad ids
    return eager_logits(m, TOKENS[:4])

  out = np.asarray(forward(state, jnp.asarray([1, 7, 2, 2**32 - 1], jnp.uint32)))  # 2**32 - 1 is not -1
  assert np.isnan(out[[1, 3]]).all() and np.isfinite(out[[0, 2]]).all()
  assert_close(out[0:1], logits(alone(model, adapters[1]), TOKENS[0:1]), rtol=1e-5)
  assert_close(out[2:3], logits(alone(model, adapters[2]), TOKENS[2:3]), rtol=1e-5)
  out = np.asarray(forward(state, jnp.asarray([-1, 0, -9, 1], jnp.int32)))
  assert np.isnan(out[2]).all()
  assert_close(out[0:1], logits(model, TOKENS[0:1]), rtol=1e-5)


@pytest.mark.parametrize("segment_max", [4 * 7, 0], ids=["segmented", "per-row"])
def test_a_nan_adapter_never_touches_other_rows(model, adapters, segment_max):
  poisoned = adapters[0].replace(pools=jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), adapters[0].pools))
  served = mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters([poisoned, *adapters[1:]]))
  ids = np.array([-1, 1, 0, 2], np.int32)
  mos_jax.nnx.set_adapter_ids(served, mos_jax.core.plan_rows(ids, K, segment_max=segment_max))
  out = np.asarray(logits(served, TOKENS[:4]))
  assert np.isnan(out[2]).all()
  assert_close(out[0:1], logits(model, TOKENS[0:1]), rtol=1e-5)
  assert_close(out[1:2], logits(alone(model, adapters[1]), TOKENS[1:2]), rtol=1e-5)
  assert_close(out[3:4], logits(alone(model, adapters[2]), TOKENS[3:4]), rtol=1e-5)


def test_stacks_for_another_model_and_single_adapters_are_refused(model, adapters):
  bigger = tiny_gemma3(layers=3)
  with pytest.raises(mos_jax.MismatchError, match="targeted kernel .* the adapter has no factors for"):
    mos_jax.nnx.adapt_multi(bigger, mos_jax.core.stack_adapters(adapters))
  with pytest.raises(TypeError, match=r"stack_adapters\(\[adapter\]\)"):
    mos_jax.nnx.adapt_multi(model, adapters[0])
  with pytest.raises(ValueError, match="already has MoS layers"):
    mos_jax.nnx.adapt_multi(mos_jax.nnx.adapt(model, adapters[0]), mos_jax.core.stack_adapters(adapters))


def test_load_pools_swaps_a_stack_in_place(model, adapters):
  served = mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters(adapters))
  mos_jax.nnx.set_adapter_ids(served, [0, 1])
  mos_jax.nnx.load_pools(served, mos_jax.core.stack_adapters([adapters[2], adapters[0], adapters[1]]))
  out = np.asarray(logits(served, TOKENS[:2]))
  assert_close(out[0:1], logits(alone(model, adapters[2]), TOKENS[0:1]), rtol=1e-5)
  assert_close(out[1:2], logits(alone(model, adapters[0]), TOKENS[1:2]), rtol=1e-5)
  with pytest.raises(mos_jax.MismatchError, match="make a new served model"):
    mos_jax.nnx.load_pools(served, mos_jax.core.stack_adapters(adapters[:2]))


@pytest.mark.parametrize("split_fused", [None, {}], ids=["kv-split", "kv-fused"])
def test_gemma_kv_einsum_split_or_fused_is_served_like_each_adapter_alone(model, split_fused):
  # Gemma's kv_einsum (2, K, D, H): adapt splits it into k and v module types by default; split_fused={} keeps it one.
  made = [mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(model, dataclasses.replace(CONFIG, seed=k), split_fused=split_fused))
          for k in range(2)]
  made = [a.replace(pools=random_pools(a.pools, seed=10 + k, scale=0.3)) for k, a in enumerate(made)]
  served = mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters(made))
  kv = served.layers[0].attn.kv_einsum
  assert type(kv).__name__ == "MultiMoSLayer"
  assert [g.name.split("/")[-1] for g in kv.parts] == (["kv_einsum"] if split_fused == {} else ["k", "v"])
  ids = np.array([1, -1, 0], np.int32)
  mos_jax.nnx.set_adapter_ids(served, ids)
  out = np.asarray(logits(served, TOKENS[:3]))
  for row, k in enumerate(ids):
    assert_close(out[row:row + 1], logits(alone(model, made[k] if k >= 0 else None), TOKENS[row:row + 1]), rtol=1e-5)
