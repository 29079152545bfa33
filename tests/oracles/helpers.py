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


def rel_err(actual, desired):
  """Largest absolute difference relative to the largest magnitude of ``desired`` (float64).

  The measure every float oracle here uses: XLA sums in another order on another CPU (or
  thread count), so an element near zero may differ by a few ulps of the array's scale, not
  of its own value; a per-element relative test would fail there on a correct result.
  """
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert a.shape == d.shape, f"shapes differ: {a.shape} vs {d.shape}"
  return float(np.abs(a - d).max(initial=0.0) / max(np.abs(d).max(initial=0.0), 1e-30))


def assert_close(actual, desired, rtol=1e-5):
  """Asserts ``rel_err(actual, desired) <= rtol``; trees are compared leaf by leaf."""
  flat_a, tree_a = jax.tree_util.tree_flatten(actual)
  flat_d, tree_d = jax.tree_util.tree_flatten(desired)
  assert tree_a == tree_d, f"tree structures differ: {tree_a} vs {tree_d}"
  for i, (a, d) in enumerate(zip(flat_a, flat_d)):
    err = rel_err(a, d)
    assert err <= rtol, f"leaf {i}: max |actual - desired| / max |desired| = {err:.3g} > {rtol:g}"
