"""Folding the adapter into the base kernels for inference, and back out."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mos_jax._assemble import Factors, layer_factors
from mos_jax._routing import Routing
from mos_jax._targets import KERNEL, path_str


def delta_weight(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale · Aᵀ Bᵀ`` in Flax's ``(d_in, d_out)`` layout (stacked if ``a`` is 3-D)."""
  return scale * jnp.einsum("...ri,...or->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def _fold(params: Any, factors: Factors, routing: Routing, sign: float) -> Any:
  per_path = layer_factors(factors, routing)
  scale = sign * routing.config.scale

  def update(path, leaf):
    p = path_str(path)
    if not p.endswith("/" + KERNEL):
      return leaf
    hit = per_path.get(p[: -len(KERNEL) - 1])
    if hit is None:
      return leaf
    return (leaf.astype(jnp.float32) + delta_weight(*hit, scale)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(update, params)


def merge(params: Any, factors: Factors, routing: Routing) -> Any:
  """Returns params with ``W + (α/r)·Aᵀ Bᵀ`` in every adapted kernel.

  Computed in float32 and cast back to each kernel's dtype; the container type
  (dict, ``FrozenDict``) is kept.

  Args:
    params: the base params the adapter was created for.
    factors: output of :func:`mos_jax.assemble`.
    routing: the adapter's routing.

  Returns:
    Plain params for the unmodified model.

  Example:
    >>> merged = merge(params, assemble(pools, routing), routing)  # doctest: +SKIP
  """
  return _fold(params, factors, routing, +1.0)


def unmerge(params: Any, factors: Factors, routing: Routing) -> Any:
  """Inverse of :func:`merge`: subtracts ``(α/r)·Aᵀ Bᵀ`` from the adapted kernels."""
  return _fold(params, factors, routing, -1.0)
