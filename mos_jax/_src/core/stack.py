"""Many adapters of one model stacked along a leading adapter axis, for multi-tenant serving.

Framework-free: a backend (``mos_jax.linen.inject_multi``, ``mos_jax.nnx.adapt_multi``)
adds the per-row term :func:`rows_term` computes for the :class:`RowPlan` of a batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.adapter import Adapter, require_adapter
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
    target_modules: adapter 0's ``MoSConfig.target_modules``: a served model's module that
      matches them but has no factors (a bigger model than the adapters were made for) is refused.
    exclude_modules: adapter 0's ``MoSConfig.exclude_modules``.
  """

  pools: dict[str, dict[str, jax.Array]]
  index_a: dict[str, jax.Array]
  index_b: dict[str, jax.Array]
  scale: jax.Array
  groups: tuple[Group, ...]
  rank: int
  target_modules: str | tuple[str, ...] = ()
  exclude_modules: str | tuple[str, ...] | None = None

  @property
  def num_adapters(self) -> int:
    return int(self.scale.shape[0])


jax.tree_util.register_dataclass(AdapterStack, data_fields=["pools", "index_a", "index_b", "scale"],
                                 meta_fields=["groups", "rank", "target_modules", "exclude_modules"])


def require_stack(stack: Any, verb: str) -> AdapterStack:
  """``stack`` if it is an :class:`AdapterStack`, else a ``TypeError`` saying how to make one."""
  if isinstance(stack, AdapterStack):
    return stack
  hint = (" To serve one adapter on every row, stack it: mos_jax.core.stack_adapters([adapter]) (or use it alone "
          "without a per-row id)." if isinstance(stack, Adapter) else "")
  raise TypeError(f"{verb} takes an AdapterStack (from mos_jax.core.stack_adapters), got {type(stack).__name__}."
                  + hint)


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
  if isinstance(adapters, Adapter):
    raise TypeError("stack_adapters takes a sequence of adapters: stack_adapters([adapter]).")
  if not adapters:
    raise ValueError("stack_adapters needs at least one adapter.")
  ref = _signature(adapters[0])
  for k, adapter in enumerate(adapters):
    check_pools(require_adapter(adapter, f"stack_adapters (item {k})").pools, adapter.spec)
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
      target_modules=adapters[0].config.target_modules,
      exclude_modules=adapters[0].config.exclude_modules,
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


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """Which adapter each row of a batch uses, prepared once for every adapted layer of a forward.

  A pytree of arrays (a jitted forward takes a new plan of the same shapes without
  recompiling). Made by :func:`plan_rows`; :func:`rows_term` reads it.

  Attributes:
    ids: ``(batch,)`` int32, the row's adapter clipped into ``[0, K)`` (for the gathers only).
    use: ``(batch,)`` bool, the row adds its adapter's term (False: an id of -1, the base model).
    bad: ``(batch,)`` bool, the id lies outside ``[-1, K)``: the row's term is NaN, never another
      adapter's or the base model's output.
    slots: ``(S,)`` int32, the distinct adapters of the batch when their terms are computed per
      adapter (segmented, S >= 1), or ``(0,)`` when each row gathers its own factors.
    slot: ``(batch,)`` int32, the row's index into ``slots`` (0 without slots).
    segment_max: (static) a layer computes a segmented batch per adapter while
      ``S x (tokens per row)`` is at most this, or ``S`` is 1; else per row.
  """

  ids: jax.Array
  use: jax.Array
  bad: jax.Array
  slots: jax.Array
  slot: jax.Array
  segment_max: int = 16

  @property
  def segmented(self) -> bool:
    return self.slots.shape[0] > 0


jax.tree_util.register_dataclass(RowPlan, data_fields=["ids", "use", "bad", "slots", "slot"],
                                 meta_fields=["segment_max"])

#: Largest number of distinct adapters (rounded up to a power of two) for which :func:`plan_rows` prepares a
#: segmented plan. A layer computes a segmented batch per adapter only while (distinct adapters) x (tokens per
#: row) is at most this too (decoding steps; a prefill of several tokens per row with one adapter): the
#: per-adapter products grow with both, while a per-row gather of the factors (BGMV) costs the same for any
#: mix (docs/serving.md).
SEGMENT_MAX = 16


def _valid_ids(ids: jax.Array, num_adapters: int) -> jax.Array:
  """Whether each id lies in ``[-1, K)``, compared in the ids' own integer dtype (unsigned included)."""
  info = jnp.iinfo(ids.dtype)
  below = ids < num_adapters if num_adapters <= info.max else jnp.ones(ids.shape, bool)
  return below & (ids >= -1) if info.min < 0 else below


def plan_rows(adapter_ids: Any, num_adapters: int, *, segment_max: int | None = None) -> RowPlan:
  """The :class:`RowPlan` of a batch: each row's adapter id (any integer dtype), checked and prepared.

  Concrete ids (NumPy, Python, or a JAX array outside ``jit``) are checked here: an id outside
  ``[-1, K)`` raises ``ValueError``. When at most ``segment_max`` distinct adapters (rounded up to a
  power of two, so that batches of similar mixes share one compilation) serve the batch, the plan is
  segmented: each adapter's factors are gathered once and its ``x Aᵀ`` computed for the batch in one
  product (the SGMV idea of multi-LoRA servers, S-LoRA/Punica, for XLA on CPU, where a per-row
  gather costs more than the base layer's own matmul in decoding). Otherwise, and always for traced
  ids (inside ``jit``, where the ids cannot be read), every row gathers its own factors (BGMV). A
  traced id outside ``[-1, K)`` makes its row NaN, and only its row.

  Args:
    adapter_ids: ``(batch,)`` integer ids in ``[-1, K)``; ``-1`` runs the base model.
    num_adapters: ``K``, the stack's number of adapters.
    segment_max: the most distinct adapters, times the tokens of each row in a layer, computed per
      adapter; ``None`` for :data:`SEGMENT_MAX`, 0 for per-row gathers always.

  Returns:
    The plan, for :func:`mos_jax.linen.inject_multi` or an NNX model of :func:`mos_jax.nnx.adapt_multi`.

  Raises:
    ValueError: ids that are not a 1-D integer array, or concrete ids outside ``[-1, K)``.

  Example:
    >>> plan = plan_rows(np.array([0, 2, -1, 2], np.int8), 3)
    >>> plan.slots.tolist(), plan.slot.tolist(), plan.use.tolist()
    ([0, 2], [0, 1, 0, 1], [True, True, False, True])
  """
  if isinstance(adapter_ids, jax.Array):
    ids = adapter_ids
  else:  # checked before any conversion: an int64 id of 2**32 + 1 must not wrap onto adapter 1
    host_ids = np.asarray(adapter_ids)
    check_ids(host_ids, num_adapters)
    ids = jnp.asarray(host_ids.astype(np.int32))
  check_ids(ids, num_adapters)
  valid = _valid_ids(ids, num_adapters)
  # int32 with an out-of-range marker K: a uint32 2**32 - 1 must not become -1 (the base model).
  ids32 = jnp.where(valid, ids.astype(jnp.int32), jnp.int32(num_adapters))
  limit = SEGMENT_MAX if segment_max is None else int(segment_max)
  plan = RowPlan(ids=jnp.clip(ids32, 0, num_adapters - 1), use=(ids32 >= 0) & (ids32 < num_adapters),
                 bad=~valid, slots=jnp.zeros((0,), jnp.int32), slot=jnp.zeros(ids.shape, jnp.int32),
                 segment_max=limit)
  if isinstance(ids, jax.core.Tracer) or limit <= 0:
    return plan
  host = np.asarray(ids32)
  distinct = np.unique(host[(host >= 0) & (host < num_adapters)])
  width = 1 << max(len(distinct) - 1, 0).bit_length()  # 1, 2, 4, 8, ...
  if width > limit:
    return plan
  slots = np.zeros(width, np.int32)
  slots[:len(distinct)] = distinct  # padding slots repeat adapter 0; no row selects them
  slot = np.searchsorted(distinct, np.clip(host, 0, None)).clip(0, max(len(distinct) - 1, 0)).astype(np.int32)
  return dataclasses.replace(plan, slots=jnp.asarray(slots), slot=jnp.asarray(slot))


def rows_term(stack: AdapterStack, group: Group, layer: int | jax.Array, plan: RowPlan, x: jax.Array) -> jax.Array:
  """Each row's ``(α_k/r)·(x_b A_kᵀ) B_kᵀ`` for its adapter ``k``; 0 on base rows, NaN on bad ids.

  Inference only (no custom gradient). Rows are isolated: a row reads only its own adapter's factors
  (per-row gather) or selects its adapter's product among the batch's adapters (segmented), and base
  and bad rows are selected, never multiplied by a 0/1 mask, so a NaN in one adapter reaches no other
  row.

  Args:
    stack: the stacked adapters.
    group: the layer's module type.
    layer: the layer's index in the group (a traced scalar inside a scan).
    plan: from :func:`plan_rows`, one row per leading entry of ``x``.
    x: the layer input, ``(batch, ..., d_in)``; the factors are cast to its dtype (a bf16 model's
      activations are never copied to the pools' float32, as in training).

  Returns:
    The term, ``(batch, ..., d_out)``.
  """
  slots, tokens_per_row = plan.slots.shape[0], math.prod(x.shape[1:-1])
  if slots == 1 or 0 < slots * tokens_per_row <= plan.segment_max:
    a, b = row_factors(stack, group, layer, plan.slots)  # (S, r, d_in), (S, d_out, r)
    a = (a * stack.scale[plan.slots][:, None, None].astype(a.dtype)).astype(x.dtype)
    b = b.astype(x.dtype)
    h = jnp.einsum("b...i,sri->b...sr", x, a)
    pick = plan.slot.reshape((-1,) + (1,) * (h.ndim - 1))
    h = jnp.take_along_axis(h, pick, axis=-2)  # (batch, ..., 1, r): the row's own adapter
    if slots == 1:
      term = jnp.einsum("b...r,or->b...o", h[..., 0, :], b[0])
    else:
      term = jnp.take_along_axis(jnp.einsum("b...r,sor->b...so", h[..., 0, :], b), pick, axis=-2)[..., 0, :]
  else:
    a, b = row_factors(stack, group, layer, plan.ids)  # (batch, r, d_in), (batch, d_out, r)
    a = (a * stack.scale[plan.ids][:, None, None].astype(a.dtype)).astype(x.dtype)
    b = b.astype(x.dtype)
    h = jnp.einsum("b...i,bri->b...r", x, a)
    term = jnp.einsum("b...r,bor->b...o", h, b)
  rows = (-1,) + (1,) * (term.ndim - 1)
  term = jnp.where(plan.use.reshape(rows), term, jnp.zeros((), term.dtype))
  return jnp.where(plan.bad.reshape(rows), jnp.full((), jnp.nan, term.dtype), term)
