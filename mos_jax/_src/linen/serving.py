"""Serving many MoS adapters in one batch of a linen model: a per-row adapter id."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np

from mos_jax._src.core.stack import AdapterStack, RowPlan, plan_rows, require_stack, rows_term
from mos_jax._src.linen.inject import scanned_layer
from mos_jax._src.linen.intercept import AdaptedCalls, flat_io, intercept_kernel_calls, module_input


@contextlib.contextmanager
def inject_multi(stack: AdapterStack, adapter_ids: jax.Array | RowPlan) -> Iterator[None]:
  """Adds row ``b``'s adapter term ``(α/r)·(x_b @ A_iᵀ) @ B_iᵀ`` to every adapted layer.

  Like :func:`mos_jax.linen.inject`, but each batch row uses the adapter
  ``adapter_ids[b]`` of ``stack`` (``-1``: no adapter, the base model), so one
  compiled forward serves any mix of adapters. The ids may have any integer dtype.
  Concrete ids, or a :func:`mos_jax.core.plan_rows` plan made on the host, let a batch
  served by few adapters compute each adapter's product once (segmented); traced ids
  (inside ``jit``) make every row gather its own factors from the stacked pools (the
  BGMV pattern of multi-LoRA servers). :func:`serve` plans on the host for you.
  Inference only: no dropout. Call (trace) the model inside the ``with``; the first
  axis of every adapted layer's input must be the batch. A model that scans its
  layers with ``nn.scan`` is called with :func:`with_factors` ``(params, stack)``.

  Rows are isolated. Invalid ids never get another adapter's output: concrete ids
  outside ``[-1, K)`` raise ``ValueError`` here; under ``jax.jit`` the ids are traced
  and cannot be checked, so such a row's output is NaN, and only that row's. A NaN
  in one adapter's pools reaches no row of another adapter or of the base model
  (rows are selected, never masked by multiplication).

  Args:
    stack: output of :func:`mos_jax.core.stack_adapters`.
    adapter_ids: ``(batch,)`` integer adapter id per row, in ``[-1, K)``, or their
      plan (:func:`mos_jax.core.plan_rows`).

  Yields:
    Nothing; models called inside the block are adapted row by row.

  Raises:
    TypeError: ``stack`` is not an :class:`~mos_jax.core.AdapterStack` (e.g. a single Adapter).
    ValueError: bad concrete ids; (during the call) a layer whose input's first axis is
      not the batch, or a module matching the adapters' targets without factors (a model
      bigger than the one the adapters were made for).
    RuntimeError: (on exit) an adapted module was never called.

  Example:
    >>> @jax.jit
    ... def forward(stack, ids, input_ids):
    ...   with inject_multi(stack, ids), jax.numpy_rank_promotion("allow"):
    ...     return model(input_ids, params=params).logits  # doctest: +SKIP
  """
  stack = require_stack(stack, "inject_multi")
  plan = adapter_ids if isinstance(adapter_ids, RowPlan) else plan_rows(adapter_ids, stack.num_adapters)
  # The stack's target patterns: a module they match that has no factors is refused, as inject does.
  calls = AdaptedCalls(stack, stack.groups)

  def handle(module, next_fun, args, kwargs):
    found = calls.resolve(module, args, kwargs)
    if found is None:
      return next_fun(*args, **kwargs)
    path, group, layer = found
    if layer is None:  # a stacked group inside nn.scan: the layer comes from the params with_factors gave
      layer = scanned_layer(module, path)
    x, unflatten = flat_io(module, group, module_input(args, kwargs), args, kwargs)
    if x.shape[0] != plan.ids.shape[0]:
      raise ValueError(f"Layer {path} got input of shape {x.shape}, whose first axis is not the batch of "
                       f"{plan.ids.shape[0]} adapter ids.")
    y = next_fun(*args, **kwargs)
    return y + unflatten(rows_term(stack, group, layer, plan, x)).astype(y.dtype)

  with intercept_kernel_calls(handle):
    yield
  calls.check_all_hit()


def serve(forward: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a (jitted) multi-adapter forward so that bad adapter ids raise before it runs.

  ``forward(stack, adapter_ids, *args, **kwargs)`` is called only after the ids
  are checked on the host (a 1-D array of any integer dtype, values in ``[-1, K)``),
  and with their plan (:func:`mos_jax.core.plan_rows`) in place of the ids: inside ``jit``,
  :func:`inject_multi` could only turn a bad id into NaN outputs, and could not see
  how many adapters the batch uses. The check costs one device-to-host copy of the
  ids (they usually come from the host anyway); batches using up to 1, 2, 4, 8 or 16
  distinct adapters (see :func:`mos_jax.core.plan_rows`), and more, compile one version each.

  Args:
    forward: a function whose first two arguments are the
      :class:`~mos_jax.core.AdapterStack` and the ``(batch,)`` adapter ids (or plan),
      which it passes to :func:`inject_multi`.

  Returns:
    The same function, checking the ids first.

  Raises:
    TypeError: (from the wrapped function) ``stack`` is not an ``AdapterStack``.
    ValueError: (from the wrapped function) an id outside ``[-1, K)``, or ids
      that are not a 1-D integer array.

  Example:
    >>> forward = serve(jax.jit(forward))  # doctest: +SKIP
    >>> logits = forward(stack, np.array([0, 2, -1]), input_ids)  # doctest: +SKIP
  """

  @functools.wraps(forward)
  def checked(stack: AdapterStack, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
    stack = require_stack(stack, "serve")
    if not isinstance(adapter_ids, RowPlan):
      adapter_ids = plan_rows(np.asarray(adapter_ids), stack.num_adapters)
    return forward(stack, adapter_ids, *args, **kwargs)

  return checked
