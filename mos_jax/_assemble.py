"""Assembly of every layer's low-rank factors from the shard pools."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mos_jax._pools import Pools, check_pools
from mos_jax._routing import Routing

Factors = dict[str, dict[str, jax.Array]]


def assemble(pools: Pools, routing: Routing) -> Factors:
  """Builds each group's stacked factors with one gather per pool.

  ``A = take(P_A, index_a).reshape(L, r, d_in)`` concatenates the ``l``
  consecutive shards of each rank vector; ``B`` likewise, transposed to
  ``(L, d_out, r)``. Pure and jit-compatible; the gradient flows back into the
  pools as a scatter-add. The routing is static, so there is no Python loop
  over layers, only over module types.

  Args:
    pools: ``{group: {"A": P_A, "B": P_B}}`` from :func:`mos_jax.adapt`.
    routing: the adapter's static routing.

  Returns:
    ``{group: {"A": (L, r, d_in), "B": (L, d_out, r)}}``; see
    :func:`layer_factors` for a per-layer view.

  Example:
    >>> factors = jax.jit(assemble, static_argnums=1)(adapter.pools, adapter.routing)  # doctest: +SKIP
  """
  check_pools(pools, routing)
  r = routing.config.rank
  factors = {}
  for g in routing.groups:
    p_a, p_b = pools[g.name]["A"], pools[g.name]["B"]
    # mode="clip": indices are valid by construction; avoids the NaN-fill select.
    a = jnp.take(p_a, routing.index_a[g.name].reshape(-1), axis=0, mode="clip")
    b = jnp.take(p_b, routing.index_b[g.name].reshape(-1), axis=0, mode="clip")
    factors[g.name] = {
        "A": a.reshape(g.num_layers, r, g.d_in),
        "B": b.reshape(g.num_layers, r, g.d_out).transpose(0, 2, 1),
    }
  return factors


def layer_factors(factors: Factors, routing: Routing) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per-layer view: module path -> ``(A_i: (r, d_in), B_i: (d_out, r))``.

  Stacked groups map their single path to the stacked ``(L, r, d_in)``,
  ``(L, d_out, r)`` pair.
  """
  out = {}
  for g in routing.groups:
    a, b = factors[g.name]["A"], factors[g.name]["B"]
    if g.stacked:
      out[g.paths[0]] = (a, b)
    else:
      for i, path in enumerate(g.paths):
        out[path] = (a[i], b[i])
  return out
