"""Many adapters of one model stacked along a leading adapter axis, for multi-tenant serving.

Framework-free: a backend (``mos_jax.linen.inject_multi``) applies the per-row
factors that :func:`row_factors` gathers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.identity import differences, groups_identity
from mos_jax._src.core.pools import check_pools, pool_shapes
from mos_jax._src.core.targets import Group


@dataclasses.dataclass(frozen=True)
class AdapterStack:
  """``K`` MoS adapters of one model, stacked along a leading adapter axis.

  A pytree: the arrays are leaves (so a jitted server takes a new set of
  adapters of the same shapes without recompiling); ``groups`` and ``rank``
  are static.

  Attributes:
    pools: ``{group: {"A": (K, N, d_in/l), "B": (K, N, d_out/l)}}``.
    index_a: ``{group: (K, L, r·l)}`` int32 shard ids; each adapter keeps its own routing.
    index_b: ``{group: (K, L, r·l)}``.
    scale: ``(K,)`` float32 ``alpha / rank`` of each adapter.
    groups: the adapted module types, shared by all adapters.
    rank: the active rank ``r``, shared by all adapters.
  """

  pools: dict[str, dict[str, jax.Array]]
  index_a: dict[str, jax.Array]
  index_b: dict[str, jax.Array]
  scale: jax.Array
  groups: tuple[Group, ...]
  rank: int

  @property
  def num_adapters(self) -> int:
    return int(self.scale.shape[0])


jax.tree_util.register_dataclass(AdapterStack, data_fields=["pools", "index_a", "index_b", "scale"],
                                 meta_fields=["groups", "rank"])


def _signature(adapter: Adapter) -> dict[str, object]:
  """What every adapter of a stack must share, as JSON."""
  c = adapter.config
  return {"rank": c.rank, "shards_per_vector": c.effective_shards_per_vector, "pool_dtype": c.pool_dtype,
          "pool_shapes": pool_shapes(c, adapter.groups), "groups": groups_identity(adapter.groups)}


def stack_adapters(adapters: Sequence[Adapter]) -> AdapterStack:
  """Stacks adapters of one model for multi-adapter serving (``mos_jax.linen.inject_multi``).

  They must share the adapted modules, ``rank``, ``shards_per_vector``,
  ``equivalent_rank`` (pool shapes) and pool dtype; seeds (routings), the
  differentiation strategies and ``alpha`` may differ per adapter.

  Args:
    adapters: the adapters, in adapter-id order.

  Returns:
    An :class:`AdapterStack` of ``len(adapters)`` adapters.

  Raises:
    ValueError: no adapters, or an adapter's shapes differ from adapter 0's.

  Example:
    >>> stack = stack_adapters([adapter_a, adapter_b])  # doctest: +SKIP
  """
  if not adapters:
    raise ValueError("stack_adapters needs at least one adapter.")
  ref = _signature(adapters[0])
  for k, adapter in enumerate(adapters):
    check_pools(adapter.pools, adapter.spec)
    bad = differences(ref, _signature(adapter), names=("adapter 0", f"adapter {k}"))
    if bad:
      raise ValueError(f"Adapter {k} cannot share a stack with adapter 0:\n  - " + "\n  - ".join(bad[:10])
                       + "\nStack only adapters made for the same model with the same target_modules, "
                       "rank, equivalent_rank, shards_per_vector and pool_dtype.")
  names = [g.name for g in adapters[0].groups]
  return AdapterStack(
      pools={n: {f: jnp.stack([a.pools[n][f] for a in adapters]) for f in ("A", "B")} for n in names},
      index_a={n: jnp.asarray(np.stack([a.spec.index_a[n] for a in adapters])) for n in names},
      index_b={n: jnp.asarray(np.stack([a.spec.index_b[n] for a in adapters])) for n in names},
      scale=jnp.asarray([a.config.scale for a in adapters], jnp.float32),
      groups=adapters[0].groups,
      rank=adapters[0].config.rank,
  )


def row_factors(stack: AdapterStack, group: Group, layer: int, adapter_ids: jax.Array,
                ) -> tuple[jax.Array, jax.Array]:
  """Each row's ``A: (batch, r, d_in)`` and ``B: (batch, d_out, r)`` for one layer.

  One gather per pool straight from the stacked pools: row ``b`` takes shards
  ``index[ids[b], layer]`` of adapter ``ids[b]``'s pool, so no adapter's full
  factors are ever built. Ids must lie in ``[0, K)``: out of range, JAX clamps
  large ids and wraps negative ones, so callers map ``-1`` themselves.
  """
  rows = adapter_ids[:, None]
  a = stack.pools[group.name]["A"][rows, stack.index_a[group.name][adapter_ids, layer]]
  b = stack.pools[group.name]["B"][rows, stack.index_b[group.name][adapter_ids, layer]]
  n = adapter_ids.shape[0]
  return a.reshape(n, stack.rank, group.d_in), b.reshape(n, stack.rank, group.d_out).transpose(0, 2, 1)


def check_ids(adapter_ids: jax.Array, num_adapters: int) -> None:
  """Raises ``ValueError`` for ids that are not a 1-D integer array, or concrete ids outside ``[-1, K)``."""
  if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids must be a 1-D integer array (one id per batch row), got "
                     f"{adapter_ids.dtype}{tuple(adapter_ids.shape)}.")
  if not isinstance(adapter_ids, jax.core.Tracer):  # concrete ids can be checked; traced ones cannot
    ids = np.asarray(adapter_ids)
    bad = np.flatnonzero((ids < -1) | (ids >= num_adapters))
    if bad.size:
      shown = ", ".join(f"row {i}: {ids[i]}" for i in bad[:8]) + (" ..." if bad.size > 8 else "")
      raise ValueError(f"adapter_ids must lie in [-1, {num_adapters}) (-1: base model only); "
                       f"{bad.size} row(s) do not ({shown}).")
