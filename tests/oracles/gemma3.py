"""A tiny random Tunix Gemma 3 for the experiments' tests (the real one is 270M parameters)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.gemma3 import model as g3


def tiny_gemma3(layers=2, vocab=64):
  """Gemma 3's structure at toy size (d=32, MLP 48, 4 heads, 2 kv heads), every weight random (seed 0).

  Tunix initialises some kernels to zero; random weights make every layer matter.
  """
  cfg = g3.ModelConfig(num_layers=layers, num_embed=vocab, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                       num_kv_heads=2, sliding_window_size=8, param_dtype=jnp.float32)
  model = g3.Gemma3(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype) for x in leaves]))
  return model
