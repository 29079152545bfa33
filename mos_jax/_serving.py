"""Serving many MoS adapters in one batch: stacked pools, a per-row adapter id."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._adapter import Adapter
from mos_jax._checkpoint import differences, groups_identity
from mos_jax._pools import check_pools, pool_shapes
from mos_jax._targets import Group, layer_of


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
  c, r = adapter.routing.config, adapter.routing
  return {"rank": c.rank, "shards_per_vector": c.effective_shards_per_vector, "pool_dtype": c.pool_dtype,
          "pool_shapes": pool_shapes(r), "groups": groups_identity(r.groups)}


def stack_adapters(adapters: Sequence[Adapter]) -> AdapterStack:
  """Stacks adapters of one model for :func:`inject_multi`.

  They must share the adapted modules, ``rank``, ``shards_per_vector``,
  ``equivalent_rank`` (pool shapes) and pool dtype; seeds (routings), the
  differentiation strategies and ``alpha`` may differ per adapter.

  Args:
    adapters: the adapters, in adapter-id order (use
      ``dataclasses.replace(adapter, pools=trained)`` to pair routing and trained pools).

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
    check_pools(adapter.pools, adapter.routing)
    bad = differences(ref, _signature(adapter), names=("adapter 0", f"adapter {k}"))
    if bad:
      raise ValueError(f"Adapter {k} cannot share a stack with adapter 0:\n  - " + "\n  - ".join(bad[:10])
                       + "\nStack only adapters made for the same model with the same target_modules, "
                       "rank, equivalent_rank, shards_per_vector and pool_dtype.")
  names = [g.name for g in adapters[0].routing.groups]
  return AdapterStack(
      pools={n: {f: jnp.stack([a.pools[n][f] for a in adapters]) for f in ("A", "B")} for n in names},
      index_a={n: jnp.asarray(np.stack([a.routing.index_a[n] for a in adapters])) for n in names},
      index_b={n: jnp.asarray(np.stack([a.routing.index_b[n] for a in adapters])) for n in names},
      scale=jnp.asarray([a.routing.config.scale for a in adapters], jnp.float32),
      groups=adapters[0].routing.groups,
      rank=adapters[0].routing.config.rank,
  )


def row_factors(stack: AdapterStack, group: str, layer: int, adapter_ids: jax.Array,
                ) -> tuple[jax.Array, jax.Array]:
  """Each row's ``A: (batch, r, d_in)`` and ``B: (batch, d_out, r)`` for one layer.

  One gather per pool straight from the stacked pools: row ``b`` takes shards
  ``index[ids[b], layer]`` of adapter ``ids[b]``'s pool, so no adapter's full
  factors are ever built. Ids must lie in ``[0, K)`` (JAX clamps out-of-range
  gathers).
  """
  g = next(g for g in stack.groups if g.name == group)
  rows = adapter_ids[:, None]
  a = stack.pools[group]["A"][rows, stack.index_a[group][adapter_ids, layer]]
  b = stack.pools[group]["B"][rows, stack.index_b[group][adapter_ids, layer]]
  n = adapter_ids.shape[0]
  return a.reshape(n, stack.rank, g.d_in), b.reshape(n, stack.rank, g.d_out).transpose(0, 2, 1)


def _check_ids(adapter_ids: jax.Array, num_adapters: int) -> None:
  if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids must be a 1-D integer array (one id per batch row), got "
                     f"{adapter_ids.dtype}{tuple(adapter_ids.shape)}.")
  if not isinstance(adapter_ids, jax.core.Tracer):  # concrete ids can be checked; traced ones cannot
    ids = np.asarray(adapter_ids)
    if ids.size and (ids.min() < -1 or ids.max() >= num_adapters):
      raise ValueError(f"adapter_ids must lie in [-1, {num_adapters}) (-1: base model only), got "
                       f"values in [{ids.min()}, {ids.max()}].")


@contextlib.contextmanager
def inject_multi(stack: AdapterStack, adapter_ids: jax.Array) -> Iterator[None]:
  """Adds row ``b``'s adapter term ``(α/r)·(x_b @ A_iᵀ) @ B_iᵀ`` to every targeted ``nn.Dense``.

  Like :func:`mos_jax.inject`, but each batch row uses the adapter
  ``adapter_ids[b]`` of ``stack`` (``-1``: no adapter, the base model). The
  per-row factors are gathered from the stacked pools inside the layer and
  applied as a batched rank-``r`` product (the BGMV pattern of multi-LoRA
  servers), so one compiled forward serves any mix of adapters. Inference only:
  no dropout. Call (trace) the model inside the ``with``; the first axis of
  every adapted layer's input must be the batch.

  Args:
    stack: output of :func:`stack_adapters`.
    adapter_ids: ``(batch,)`` int adapter id per row, in ``[-1, K)``.

  Yields:
    Nothing; models called inside the block are adapted row by row.

  Example:
    >>> @jax.jit
    ... def forward(stack, ids, input_ids):
    ...   with inject_multi(stack, ids), jax.numpy_rank_promotion("allow"):
    ...     return model(input_ids, params=params).logits  # doctest: +SKIP
  """
  stacked = [g.name for g in stack.groups if g.stacked]
  if stacked:
    raise NotImplementedError(f"Groups {stacked} are stacked (nn.scan) kernels; per-layer injection "
                              "needs unrolled layers.")
  adapter_ids = jnp.asarray(adapter_ids)
  _check_ids(adapter_ids, stack.num_adapters)
  lookup = layer_of(stack.groups)
  # Rows with id -1 gather adapter 0's shards (clipped) and are zeroed by their scale.
  ids = jnp.maximum(adapter_ids, 0)
  row_scale = jnp.where(adapter_ids >= 0, stack.scale[ids], 0.0)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    hit = lookup.get("/".join(module.path))
    if hit is None:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if x.shape[0] != ids.shape[0]:
      raise ValueError(f"Layer {'/'.join(module.path)} got input of shape {x.shape}, whose first axis "
                       f"is not the batch of {ids.shape[0]} adapter ids.")
    y = next_fun(*args, **kwargs)
    a, b = row_factors(stack, *hit, ids)
    x = x.astype(a.dtype)
    h = jnp.einsum("b...i,bri->b...r", x, a)
    term = jnp.einsum("b...r,bor->b...o", h, b)
    return y + (term * row_scale.reshape((-1,) + (1,) * (term.ndim - 1))).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield
