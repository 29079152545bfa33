"""Running a Gemma-3-signature NNX model on whole sequences: masks, positions, logits, next-token NLL.

Any model called as ``model(tokens, positions, cache, attention_mask) -> (logits, cache)``
(Tunix's ``Gemma3``, also after ``mos_jax.nnx.adapt``) works. No KV cache here: generation goes
through Tunix's ``Sampler`` (:mod:`experiments.lib.sampling`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def causal_mask(valid: jax.Array) -> jax.Array:
  """``(B, T, T)`` bool attention mask: causal, and only to valid (non-padding) keys.

  Args:
    valid: ``(B, T)`` bool, False at padding.

  Returns:
    The mask, ``mask[b, i, j] = valid[b, j] and j <= i``.
  """
  t = valid.shape[1]
  return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


def positions_of(valid: jax.Array) -> jax.Array:
  """``(B, T)`` int32 positions: 0 at each row's first valid token (left padding gets 0)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def forward(model: Any, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Logits ``(B, T, vocab)`` of a full (left- or right-padded) batch, without a KV cache.

  Works for any NNX model with Gemma 3's call signature
  ``model(tokens, positions, cache, attention_mask) -> (logits, cache)``.

  Args:
    model: the model.
    tokens: ``(B, T)`` int token ids.
    valid: ``(B, T)`` bool, False at padding; ``None`` for all valid.

  Returns:
    The logits (float32 or the model's dtype).
  """
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  valid = jnp.ones(tokens.shape, dtype=bool) if valid is None else jnp.asarray(valid, dtype=bool)
  graphdef, state = nnx.split(model)
  return _forward_jit(_Graph(graphdef), state, tokens, valid)


class _Graph:
  """A hashable stand-in for an NNX ``GraphDef``, to pass it to ``jax.jit`` as a static argument.

  Tunix's ``ModelConfig`` (a static attribute of the graph) is comparable but not hashable,
  so the ``GraphDef`` is not either. The hash here uses only the graph's sizes; equality is
  the ``GraphDef``'s own, so equal structures share one compilation.

  ``nnx.jit`` would avoid this wrapper, but it returns the model's whole state from the
  compiled function: a copy of every weight per call.
  """

  __slots__ = ("graphdef",)

  def __init__(self, graphdef: Any):
    self.graphdef = graphdef

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Graph) and self.graphdef == other.graphdef

  def __hash__(self) -> int:
    return hash((type(self.graphdef), len(self.graphdef.nodes), len(self.graphdef.attributes)))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graph: _Graph, state: Any, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  model = nnx.merge(graph.graphdef, state)
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    logits, _ = model(tokens, positions_of(valid), None, causal_mask(valid))
  return logits


def next_token_nll(model: Any, tokenizer: Any, text: str) -> float:
  """Mean next-token negative log-likelihood of ``text`` in nats (``<bos>`` prepended).

  Every token after ``<bos>`` is predicted from those before it; ~2.3-2.8 nats on plain
  English for Gemma 3 270M.

  Args:
    model: a Gemma 3 NNX model (or one with its call signature).
    tokenizer: has ``encode(text, bos=True)`` (:class:`experiments.lib.gemma3_tokenizer.Tokenizer`).
    text: the text (at least one token).

  Returns:
    The mean NLL.
  """
  ids = jnp.asarray([tokenizer.encode(text, bos=True)], dtype=jnp.int32)
  logits = forward(model, ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)
  return float(nll.mean())


def random_batch(vocab: int, batch: int, seq: int) -> dict[str, jax.Array]:
  """A fixed batch of random tokens (ids 3..vocab) with its positions and causal mask, for benchmarks."""
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 3, vocab, dtype=jnp.int32)
  valid = jnp.ones(tokens.shape, bool)
  return {"tokens": tokens, "positions": positions_of(valid), "mask": causal_mask(valid)}
