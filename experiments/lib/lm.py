"""Instruction tuning of a HF Flax causal LM with MoS: formatting, loss masking, training, decoding.

An example is a (prompt, response) pair formatted as ``PROMPT_TEMPLATE`` + response + EOS;
the loss covers the response tokens (and EOS) only. Batches are right-padded to a fixed
length with an attention mask, so one compiled step serves the whole run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib.config import TrainConfig
from experiments.lib.loop import fit
from experiments.lib.outputs import save_outputs

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclasses.dataclass
class LMData:
  """Tokenized examples: int32 ``(n, max_len)`` ids, attention and loss masks."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
            "loss_mask": self.loss_mask[idx]}


def _pad_id(tokenizer: Any) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
  """Token ids of ``BOS? PROMPT_TEMPLATE(prompt)``, as both training and decoding see it."""
  ids = tokenizer(PROMPT_TEMPLATE.format(prompt=prompt), add_special_tokens=True)["input_ids"]
  if ids and ids[-1] == tokenizer.eos_token_id:  # tokenizers that append EOS themselves
    ids = ids[:-1]
  return ids


def encode_example(tokenizer: Any, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
  """Token ids of ``BOS? prompt response EOS`` and a mask that is 1 on response tokens only.

  The response is truncated (never the prompt) to fit ``max_len``.
  """
  prefix = prompt_ids(tokenizer, prompt)
  answer = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  if len(prefix) >= max_len:
    raise ValueError(f"Prompt of {len(prefix)} tokens does not fit max_len={max_len}: raise max_len "
                     f"or shorten the prompt ({prompt[:60]!r}...).")
  ids = (prefix + answer)[:max_len]
  return ids, [0] * len(prefix) + [1] * (len(ids) - len(prefix))


def encode(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int, *, skip_long: bool = False) -> LMData:
  """Tokenizes and right-pads (prompt, response) pairs.

  With ``skip_long``, pairs whose prompt alone does not fit ``max_len`` are dropped
  (and counted in a printed line) instead of raising.
  """
  rows = []
  for prompt, response in pairs:
    try:
      rows.append(encode_example(tokenizer, prompt, response, max_len))
    except ValueError:
      if not skip_long:
        raise
  if skip_long and len(rows) < len(pairs):
    print(f"skipped {len(pairs) - len(rows)} of {len(pairs)} examples whose prompt exceeds {max_len} tokens")
  if not rows:
    raise ValueError("No examples to encode.")
  ids = np.full((len(rows), max_len), _pad_id(tokenizer), np.int32)
  attn, loss = np.zeros_like(ids), np.zeros_like(ids)
  for i, (row, mask) in enumerate(rows):
    ids[i, :len(row)], attn[i, :len(row)], loss[i, :len(row)] = row, 1, mask
  return LMData(ids, attn, loss)


def masked_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over positions whose *target* is a response token.

  Position ``t`` predicts token ``t+1``; it counts iff ``loss_mask[t+1] == 1``.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def lm_loss_fn(model: Any, *, full_finetune: bool = False):
  """``loss(trainable, params, batch, rng)``; ``trainable`` is an :class:`mos_jax.Adapter`, or the full params."""
  def loss(trainable, params, batch, rng):
    if full_finetune:  # the params themselves are trained
      params, ctx = trainable, jax.numpy_rank_promotion("allow")
    else:
      ctx = mos_jax.linen.inject(trainable, dropout_rng=rng)
    with ctx, jax.numpy_rank_promotion("allow"):
      logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params).logits
    return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
  return loss


def train_lm(model: Any, params: Any, train_data: LMData, eval_data: LMData, cfg: TrainConfig, *,
             full_finetune: bool = False, name: str = "lm") -> dict[str, Any]:
  """Fine-tunes with MoS (``cfg.mos``) or, with ``full_finetune``, every parameter.

  Returns:
    ``{"metrics", "trainable_state", "adapter" (the trained one; ``None`` for a full
    fine-tune), "step_seconds", "paths"}``; evaluation reports the masked loss on ``eval_data``.
  """
  if not full_finetune and cfg.mos is None:
    raise ValueError("TrainConfig.mos is None: give a MoS config or full_finetune=True.")
  loss = lm_loss_fn(model, full_finetune=full_finetune)
  eval_loss = jax.jit(loss)
  rng = np.random.default_rng(cfg.seed)

  def next_batch(step: int):
    idx = rng.choice(len(train_data), size=cfg.batch_size, replace=len(train_data) < cfg.batch_size)
    return train_data.rows(idx), cfg.batch_size

  def evaluate(trainable) -> dict[str, float]:
    n = len(eval_data)
    total = sum(float(eval_loss(trainable, params, eval_data.rows(np.arange(i, min(i + cfg.eval_batch_size, n))), None))
                * (min(i + cfg.eval_batch_size, n) - i) for i in range(0, n, cfg.eval_batch_size))
    return {"eval_loss": total / n}

  init = params if full_finetune else mos_jax.adapt(params, cfg.mos)
  result = fit(loss, init, params, next_batch, cfg, evaluate=evaluate, name=name)
  adapter = None if full_finetune else result["trainable"]
  paths = {"metrics": result["metrics_path"], "plot": result["plot_path"]}
  if adapter is not None:
    paths["adapter"] = save_outputs(Path(cfg.out_dir), cfg, adapter=adapter)
  return {"metrics": result["metrics"], "trainable_state": result["trainable"], "adapter": adapter,
          "step_seconds": result["step_seconds"], "paths": paths}


def left_pad_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Formatted prompts as left-padded ids and mask, ready for ``mos_jax.hf.generate``."""
  rows = [prompt_ids(tokenizer, p) for p in prompts]
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), _pad_id(tokenizer), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def decode_new(tokenizer: Any, sequences: np.ndarray, prompt_width: int) -> list[str]:
  """The generated continuations, cut at the first EOS."""
  out = []
  for row in np.asarray(sequences)[:, prompt_width:]:
    row = row.tolist()
    if tokenizer.eos_token_id in row:
      row = row[:row.index(tokenizer.eos_token_id)]
    out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
  return out
