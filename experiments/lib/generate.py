"""Greedy generation on held-out prompts after training: the optional generation eval of ``experiments.train``.

Each prompt is a held-out row's conversation up to its last assistant turn, in the model's chat
template; the model (with the trained adapter) continues it greedily for at most ``max_new_tokens``
tokens or until an end-of-turn token. One fixed-shape forward pass per new token (no KV cache: the
sequences are short and it is run once), on the training mesh. Process 0 writes
``generations.jsonl``: ``{"row", "prompt", "reference", "generated"}`` per prompt.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import mos_jax
from experiments.lib import chat_data, nnx_models
from experiments.lib.workdir import JsonlLog

#: Tokens that end an assistant turn in the supported families' templates.
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>")


def stop_ids(tokenizer: Any) -> set[int]:
  ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  vocab = tokenizer.get_vocab()
  return ids | {vocab[t] for t in END_OF_TURN if t in vocab}


def prompt_of(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], str, str]:
  """``(prompt ids, prompt text, reference answer)``: the conversation before its last assistant turn."""
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False)["input_ids"], text, messages[last]["content"]


def write_generations(workdir: Any, graphdef: Any, adapter: Any, state: Any, tokenizer: Any,
                      records: Sequence[Any], rows: Sequence[int], *, mesh: Any, state_sharding: Any, seq_len: int,
                      max_new_tokens: int, main: bool) -> list[dict[str, Any]]:
  """Generates for ``rows`` of ``records`` and (process 0) writes ``workdir/generations.jsonl``; returns the rows."""
  prompts = [prompt_of(tokenizer, chat_data.messages_of(records[int(r)], f"row {r}")) for r in rows]
  # Prompts keep their last seq_len - 1 tokens (at least one new token fits); generation stops at seq_len.
  prompts = [(ids[-(seq_len - 1):], text, ref) for ids, text, ref in prompts]
  width = min(seq_len, max(len(p[0]) for p in prompts) + max_new_tokens)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  tokens = np.full((len(prompts), width), pad, np.int32)
  lengths = np.array([len(p[0]) for p in prompts], np.int32)
  for i, (ids, _, _) in enumerate(prompts):
    tokens[i, :len(ids)] = ids
  replicated = NamedSharding(mesh, P())

  @jax.jit
  def next_tokens(adapter, state, tokens, lengths):
    model = mos_jax.nnx.bind(graphdef, adapter, state, rng=jax.random.key(0))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    h = nnx_models.hidden_states(model, tokens, positions, nnx_models.attention_mask(segments))
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
    return jnp.argmax(nnx_models.logits_of(model, last)[:, 0], axis=-1)

  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

  stops, done = stop_ids(tokenizer), np.zeros(len(prompts), bool)
  generated: list[list[int]] = [[] for _ in prompts]
  for _ in range(max_new_tokens):
    new = np.asarray(jax.device_get(next_tokens(adapter, state, put(tokens), put(lengths)).addressable_data(0)))
    for i, t in enumerate(new):
      if done[i] or lengths[i] >= width:
        done[i] = True
        continue
      if int(t) in stops:
        done[i] = True
        continue
      generated[i].append(int(t))
      tokens[i, lengths[i]] = t
      lengths[i] += 1
    if done.all():
      break
  out = [{"row": int(r), "prompt": p[1], "reference": p[2],
          "generated": tokenizer.decode(g, skip_special_tokens=True)} for r, p, g in zip(rows, prompts, generated)]
  if main:
    log = JsonlLog(workdir / "generations.jsonl")
    for row in out:
      log.write(row)
    log.close()
  return out
