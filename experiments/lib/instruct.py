"""Prompt/response pairs for a Gemma-3-shaped NNX model: fixed-shape batches and response-token scores.

An example is ``<bos> prompt`` followed by the response and ``<eos>``, right-padded to a fixed
length. Only the response tokens are scored, so the model's output head (Gemma 3's tied
262k-word embedding: 168M of the 270M model's 268M weights) is applied at those few positions,
not at every position: a training step of Gemma 3 270M at batch 8 x 48 tokens took 2.9 s this
way against 10.6 s with every position's logits (2 CPU cores).

A batch is a dict of NumPy arrays (one compiled step serves every batch of the same size):

- ``tokens`` ``(B, T)`` int32 and ``valid`` ``(B, T)`` bool: the padded sequences;
- ``positions`` ``(B, K)`` int32: where the output predicts response token ``k`` (one before it);
- ``targets`` ``(B, K)`` int32 and ``weights`` ``(B, K)`` float32: the response tokens, and 1 on
  real ones (0 past a shorter response);
- ``label`` ``(B,)`` int32: the index of the right answer among the candidate responses, for a
  multiple-choice score (see :func:`score_sums`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib import lm_eval
from experiments.lib.config import TrainConfig
from experiments.lib.loop import fit

Batch = dict[str, np.ndarray]


def encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[int], *,
                 seq_len: int, response_len: int) -> tuple[Batch, np.ndarray]:
  """Encodes (prompt, response) pairs; pairs that do not fit are dropped, not truncated.

  Truncating would score a cut response (or train on a review without its end), so a pair
  whose ``<bos> prompt response <eos>`` exceeds ``seq_len`` tokens, or whose response with
  ``<eos>`` exceeds ``response_len`` tokens, is left out.

  Args:
    tokenizer: has ``encode(text, bos)``, ``eos_id`` and ``pad_id`` (:class:`~experiments.lib.gemma3_tokenizer.Tokenizer`).
    prompts: the prompts.
    responses: the responses (a space is put before each, as after "Answer:").
    labels: per pair, the index of its response among the candidates (for :func:`score_sums`).
    seq_len: the padded length ``T``.
    response_len: ``K``, the most response tokens (``<eos>`` included).

  Returns:
    ``(batch, kept)``: the arrays of the module docstring for the pairs that fit, and the
    indices of those pairs in the input.

  Raises:
    ValueError: the lengths differ, or no pair fits.
  """
  if not len(prompts) == len(responses) == len(labels):
    raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(labels)} labels")
  rows, kept = [], []
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    head = tokenizer.encode(prompt, bos=True)
    tail = tokenizer.encode(" " + response, bos=False) + [tokenizer.eos_id]
    if len(head) + len(tail) <= seq_len and len(tail) <= response_len:
      rows.append((head, tail))
      kept.append(i)
  if not rows:
    raise ValueError(f"no (prompt, response) pair fits seq_len={seq_len} and response_len={response_len}")
  n = len(rows)
  batch = {"tokens": np.full((n, seq_len), tokenizer.pad_id, np.int32), "valid": np.zeros((n, seq_len), bool),
           "positions": np.zeros((n, response_len), np.int32), "targets": np.zeros((n, response_len), np.int32),
           "weights": np.zeros((n, response_len), np.float32),
           "label": np.asarray([labels[i] for i in kept], np.int32)}
  for row, (head, tail) in enumerate(rows):
    ids = head + tail
    batch["tokens"][row, :len(ids)] = ids
    batch["valid"][row, :len(ids)] = True
    k = len(tail)
    # Position p's output predicts token p + 1: the first response token is predicted at the
    # prompt's last token. Padding slots point at position 0 and carry weight 0.
    batch["positions"][row, :k] = np.arange(len(head) - 1, len(ids) - 1)
    batch["targets"][row, :k] = tail
    batch["weights"][row, :k] = 1.0
  return batch, np.asarray(kept, np.int64)


def take(batch: Batch, idx: np.ndarray) -> Batch:
  """The rows ``idx`` of every array of a batch."""
  return {k: v[idx] for k, v in batch.items()}


def size(batch: Batch) -> int:
  return len(batch["tokens"])


def by_length(batch: Batch, rows_per_batch: int, multiple: int = 16) -> list[tuple[np.ndarray, Batch]]:
  """Splits a batch into batches of ``rows_per_batch`` rows of similar lengths, each cut to fewer columns.

  Rows are sorted by length and taken ``rows_per_batch`` at a time; each batch keeps the
  columns up to its longest row rounded up to ``multiple``, so that a split of short and long
  examples pays little padding and compiles one shape per width. The last batch is filled up
  with copies of its last row: every batch has ``rows_per_batch`` rows.

  Args:
    batch: a batch whose rows are padded to one length ``T``.
    rows_per_batch: the rows of each batch.
    multiple: the granularity of the widths (fewer distinct shapes against more padding).

  Returns:
    ``(rows, sub)`` pairs: ``rows``, the indices in ``batch`` of ``sub``'s first ``len(rows)``
    rows (the real ones; any further rows are fillers), and ``sub``, the batch.

  Example:
    >>> for rows, sub in by_length(split, 25):  # doctest: +SKIP
    ...   scores[rows] = np.asarray(score(sub))[:len(rows)]
  """
  if rows_per_batch < 1:
    raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
  lengths = batch["valid"].sum(axis=1)
  order = np.argsort(lengths, kind="stable")
  out = []
  for start in range(0, len(order), rows_per_batch):
    rows = order[start:start + rows_per_batch]
    sub = take(batch, np.concatenate([rows, np.full(rows_per_batch - len(rows), rows[-1])]))
    width = min(-(-int(lengths[rows].max()) // multiple) * multiple, batch["tokens"].shape[1])
    sub["tokens"], sub["valid"] = sub["tokens"][:, :width], sub["valid"][:, :width]
    out.append((rows, sub))
  return out


def hidden_states(model: Any, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """The final-norm hidden states ``(B, T, D)`` of a Tunix ``Gemma3`` (text only, no KV cache).

  The same computation as ``model(tokens, positions, None, mask)`` (embed, every decoder
  layer, final norm) without the output head, so that the head can be applied only where it
  is needed. Works on an adapted model (``mos_jax.nnx.adapt`` wraps projections, not layers).
  """
  positions, mask = lm_eval.positions_of(valid), lm_eval.causal_mask(valid)
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    x = model.embedder.encode(tokens)
    for layer in model.layers:
      _, x = layer(x, positions, None, mask)
    return model.final_norm(x)


def response_logits(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Float32 logits ``(B, K, vocab)`` at the positions that predict the response tokens."""
  h = hidden_states(model, batch["tokens"], batch["valid"])
  h = jnp.take_along_axis(h, batch["positions"][..., None], axis=1)
  return model.embedder.decode(h).astype(jnp.float32)


def response_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy over the batch's response tokens (the training loss)."""
  nll = optax.softmax_cross_entropy_with_integer_labels(response_logits(model, batch), batch["targets"])
  weights = batch["weights"]
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def score_sums(model: Any, batch: dict[str, jax.Array], choice_ids: jax.Array) -> dict[str, jax.Array]:
  """Sums over a batch from which :func:`metrics` makes held-out scores.

  Args:
    model: the model.
    batch: a batch; ``label`` indexes ``choice_ids``.
    choice_ids: ``(C,)`` the first token of each candidate response (e.g. the label words).

  Returns:
    ``nll`` (summed over response tokens), ``tokens``, ``first_nll`` (of the first response
    token), ``correct`` (the right candidate's first token has the highest logit among the
    candidates: multiple-choice accuracy), ``greedy`` (it is the model's top token over the
    whole vocabulary: what greedy decoding would answer) and ``examples``.
  """
  logits = response_logits(model, batch)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["weights"]
  first = logits[:, 0]
  right = jnp.take(choice_ids, batch["label"])
  return {"nll": nll.sum(), "tokens": batch["weights"].sum(), "first_nll": nll[:, 0].sum(),
          "correct": (jnp.argmax(first[:, choice_ids], axis=-1) == batch["label"]).sum(),
          "greedy": (jnp.argmax(first, axis=-1) == right).sum(), "examples": jnp.float32(batch["label"].shape[0])}


def metrics(sums_of: Any, batch: Batch, eval_batch: int) -> dict[str, float]:
  """Held-out scores of a whole split, batch by batch.

  Args:
    sums_of: ``sums_of(batch) -> score_sums(...)``, jitted by the caller.
    batch: the split; its size must be a multiple of ``eval_batch`` (one compiled shape).
    eval_batch: the examples per call.

  Returns:
    ``nll`` (mean per response token, nats), ``first_nll`` (mean of the first response
    token), ``accuracy`` (multiple choice), ``greedy`` (top-1 over the vocabulary) and ``n``.
  """
  n = size(batch)
  if n % eval_batch:
    raise ValueError(f"split of {n} examples is not a multiple of eval_batch={eval_batch}")
  total: dict[str, float] = {}
  for i in range(0, n, eval_batch):
    for k, v in sums_of(take(batch, np.arange(i, i + eval_batch))).items():
      total[k] = total.get(k, 0.0) + float(v)
  return {"nll": total["nll"] / total["tokens"], "first_nll": total["first_nll"] / total["examples"],
          "accuracy": total["correct"] / total["examples"], "greedy": total["greedy"] / total["examples"], "n": n}


def train_adapter(model: Any, next_batch: Any, cfg: TrainConfig, *, name: str = "run") -> dict[str, Any]:
  """Adapts ``model`` with ``cfg.mos``, trains the adapter on :func:`response_loss` with :func:`fit`.

  Args:
    model: the frozen NNX model (not modified).
    next_batch: ``next_batch(step) -> (batch, examples)`` (see :func:`fit`).
    cfg: the run; ``cfg.mos`` (its ``seed`` included) makes the adapter.
    name: the run's label.

  Returns:
    :func:`fit`'s result plus ``graphdef`` and ``state`` (the adapted model's frozen part) and
    ``adapter`` (the trained one), for :func:`scorer`.
  """
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, cfg.mos))

  def loss_fn(adapter, state, batch, rng):
    return response_loss(mos_jax.nnx.bind(graphdef, adapter, state, rng=rng), batch)

  result = fit(loss_fn, adapter, state, next_batch, cfg, evaluate=lambda trainable: {}, name=name)
  return {**result, "graphdef": graphdef, "state": state, "adapter": result["trainable"]}


def scorer(trained: dict[str, Any], choice_ids: np.ndarray) -> Any:
  """``sums_of(batch)`` for :func:`metrics`: :func:`score_sums` of a :func:`train_adapter` result, jitted."""
  graphdef, state, adapter = trained["graphdef"], trained["state"], trained["adapter"]
  sums = jax.jit(lambda adapter, state, batch: score_sums(mos_jax.nnx.bind(graphdef, adapter, state), batch,
                                                         choice_ids))
  return lambda batch: sums(adapter, state, batch)
