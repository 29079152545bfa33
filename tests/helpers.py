"""Small params pytrees shaped like real models, for tests that need no model."""

import jax
import jax.numpy as jnp
import numpy as np


def layered_params(num_layers, shapes, *, stacked=False):
  """``{"layers": {"0": {name: {"kernel"}}}}`` (or one stacked ``(L, d_in, d_out)`` kernel per name).

  Stacked kernels are adapted only when declared: ``MoSConfig(stacked_modules=..., layer_axis=0)``.
  """
  if stacked:
    return {"layers": {name: {"kernel": jnp.zeros((num_layers, *s))} for name, s in shapes.items()}}
  return {"layers": {str(i): {name: {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[1:])}
                              for name, s in shapes.items()} for i in range(num_layers)}}


def random_pools(pools, seed=0):
  """Replaces every pool (B included, which starts at zero) by random values.

  Use as ``adapter.replace(pools=random_pools(adapter.pools))``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(pools)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves])
