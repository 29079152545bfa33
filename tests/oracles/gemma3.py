"""A tiny random Tunix Gemma 3 for the experiments' tests (the real one is 270M parameters)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.gemma3 import model as g3


def randomize(model, seed=0, scale=0.2):
  """Every weight of an NNX model random (normal, ``scale``): Tunix initialises some kernels to zero; random
  weights make every layer matter."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(scale * rng.normal(size=x.shape), x.dtype) for x in leaves]))
  return model


def tiny_gemma3(layers=2, vocab=64):
  """Gemma 3's structure at toy size (d=32, MLP 48, 4 heads, 2 kv heads), every weight random (seed 0)."""
  cfg = g3.ModelConfig(num_layers=layers, num_embed=vocab, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                       num_kv_heads=2, sliding_window_size=8, param_dtype=jnp.float32)
  return randomize(g3.Gemma3(cfg, rngs=nnx.Rngs(0)))


def greedy_by_full_forward(model, tokenizer, prompts, n):
  """Greedy continuations without a KV cache: each prompt alone, the argmax of a full forward per new token.

  The oracle of a sampler's greedy decoding. Rows are right-padded to one width (one compilation); the
  causal mask keeps the padding after a row's tokens out of them, and nothing pads before a prompt.

  Args:
    model: a Gemma-3-signature NNX model.
    tokenizer: has ``encode(text, bos=True)`` and ``pad_id``.
    prompts: the prompts.
    n: the new tokens per prompt (stop tokens included: cut at them yourself).

  Returns:
    One list of ``n`` token ids per prompt.
  """
  from experiments.lib import lm_eval  # noqa: PLC0415  (the full-sequence forward, no cache)

  ids = [tokenizer.encode(p, bos=True) for p in prompts]
  width = max(map(len, ids)) + n
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  lengths = np.array([len(i) for i in ids])
  for row, i in enumerate(ids):
    tokens[row, :len(i)] = i
  new = [[] for _ in prompts]
  for _ in range(n):
    logits = np.asarray(lm_eval.forward(model, tokens, np.arange(width) < lengths[:, None]))
    for row in range(len(ids)):
      token = int(logits[row, lengths[row] - 1].argmax())
      tokens[row, lengths[row]] = token
      lengths[row] += 1
      new[row].append(token)
  return new
