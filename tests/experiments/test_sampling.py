"""Generation through Tunix's Sampler (experiments/lib/sampling.py) on a tiny random Tunix Gemma 3.

Oracles: greedy tokens against the argmax of a full forward re-run per new token (no KV cache, no
padding before the prompt); sampled tokens against ``softmax(logits / T)`` of that forward. The real
Gemma 3 270M: tests/experiments/test_gemma3_real.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix.generate.sampler")

import mos_jax  # noqa: E402
from experiments.lib import lm_eval, sampling  # noqa: E402
from nnx.test_serving import Tokenizer as CharProcessor  # noqa: E402  (Tunix's side: characters -> ids 4..63)
from oracles.gemma3 import greedy_by_full_forward, tiny_gemma3  # noqa: E402
from oracles.helpers import random_pools  # noqa: E402


class CharTokenizer:
  """A stand-in for gemma3_tokenizer.Tokenizer: its processor, ids, ``encode(text, bos)`` and stop ids."""

  sp = CharProcessor()
  pad_id, eos_id, bos_id = 0, 1, 2
  stop_ids = (1,)

  def encode(self, text, bos=True):
    return [self.bos_id] * bos + self.sp.encode(text)


TOK = CharTokenizer()
PROMPTS = ["hello", "hi there, friend", "abc"]  # different lengths: left padding in the sampler's batch


def check_greedy(out, model, n):
  ref = greedy_by_full_forward(model, TOK, PROMPTS, n)
  for row, tokens in enumerate(out.tokens):
    stop = next((i for i, t in enumerate(ref[row]) if t in TOK.stop_ids), n)
    assert [int(t) for t in tokens] == ref[row][:stop], PROMPTS[row]
  return ref


@pytest.mark.slow  # compiles the sampler's prefill and decoding on an adapted model: ~5 s
def test_greedy_tokens_equal_the_full_forward_argmax_before_and_after_loading_pools():
  # As in the demo: one sampler over the adapted model, pools written in place between the two calls.
  model = tiny_gemma3()
  adapted = mos_jax.nnx.adapt(model, mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                                                       target_modules=mos_jax.nnx.GEMMA3_TARGETS))
  sampler = sampling.make_sampler(adapted, TOK, cache_size=sampling.needed_cache_size(TOK, PROMPTS, 6))
  before = sampling.generate(sampler, TOK, PROMPTS, 6)
  base = check_greedy(before, model, 6)  # B pools start at zero: the adapted model is the base
  adapter = mos_jax.nnx.adapter_of(adapted)
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=1, scale=0.5)))
  after = sampling.generate(sampler, TOK, PROMPTS, 6)
  assert check_greedy(after, adapted, 6) != base  # the sampler read the new pools


@pytest.mark.slow  # 4,096 rows and a second compilation (sampling mode): ~4 s
def test_sampling_draws_from_softmax_of_the_logits_at_the_temperature():
  model, rows, temperature = tiny_gemma3(), 4096, 2.0
  sampler = sampling.make_sampler(model, TOK, cache_size=16)
  out = sampling.generate(sampler, TOK, ["hello"] * rows, 1, temperature=temperature, key=jax.random.key(1))
  first = np.array([int(t[0]) if len(t) else TOK.eos_id for t in out.tokens])  # a drawn <eos> ends the row
  logits = np.asarray(lm_eval.forward(model, jnp.asarray([TOK.encode("hello")])), np.float64)[0, -1]

  def distance(t):  # total variation between the draws and softmax(logits / t)
    p = np.exp((logits - logits.max()) / t)
    return 0.5 * np.abs(np.bincount(first, minlength=p.size) / rows - p / p.sum()).sum()

  assert distance(temperature) < 0.07  # sampling noise of 4,096 draws over 64 ids: ~0.05
  assert distance(temperature) < min(distance(1.0), distance(4.0)) - 0.02  # and the temperature is applied
  again = sampling.generate(sampler, TOK, ["hello"] * rows, 1, temperature=temperature, key=jax.random.key(1))
  assert [list(t) for t in again.tokens] == [list(t) for t in out.tokens]  # the key fixes the draws


def test_bad_input_is_refused_before_anything_runs():
  model = tiny_gemma3()
  with pytest.raises(ValueError, match=r"lacks \['num_layers', 'num_kv_heads', 'head_dim'\]. Fix: pass a Tunix model"):
    sampling.make_sampler(model.final_norm, TOK)
  sampler = sampling.make_sampler(model, TOK, cache_size=16)
  # "hi there, friend": 17 tokens with <bos>, padded to 32, + 4 new tokens.
  with pytest.raises(ValueError, match=r"need a KV cache of 36, and this sampler's holds 16. Fix: "
                                       r"make_sampler\(model, tokenizer, cache_size=36\)"):
    sampling.generate(sampler, TOK, PROMPTS, 4)
  assert sampling.needed_cache_size(TOK, PROMPTS, 4) == 36
  for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}):
    with pytest.raises(ValueError, match="at least one prompt, max_new_tokens >= 1 and temperature >= 0"):
      sampling.generate(sampler, TOK, PROMPTS, **{"max_new_tokens": 2, **bad})
  with pytest.raises(ValueError, match="got 0 prompts"):
    sampling.generate(sampler, TOK, [], 2)
