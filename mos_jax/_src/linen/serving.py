"""Serving many MoS adapters in one batch of a linen model: a per-row adapter id."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.assemble import low_rank_term
from mos_jax._src.core.stack import AdapterStack, check_ids, row_factors
from mos_jax._src.linen.inject import scanned_layer
from mos_jax._src.linen.intercept import AdaptedCalls, flat_io, intercept_kernel_calls, module_input


@contextlib.contextmanager
def inject_multi(stack: AdapterStack, adapter_ids: jax.Array) -> Iterator[None]:
  """Adds row ``b``'s adapter term ``(α/r)·(x_b @ A_iᵀ) @ B_iᵀ`` to every adapted layer.

  Like :func:`mos_jax.linen.inject`, but each batch row uses the adapter
  ``adapter_ids[b]`` of ``stack`` (``-1``: no adapter, the base model). The
  per-row factors are gathered from the stacked pools inside the layer and
  applied as a batched rank-``r`` product (the BGMV pattern of multi-LoRA
  servers), so one compiled forward serves any mix of adapters. Inference only:
  no dropout. Call (trace) the model inside the ``with``; the first axis of
  every adapted layer's input must be the batch. A model that scans its layers with ``nn.scan``
  is called with :func:`with_factors` ``(params, stack)``.

  Invalid ids never get another adapter's output. Concrete ids outside
  ``[-1, K)`` raise ``ValueError`` here; under ``jax.jit`` the ids are traced
  and cannot be checked while tracing, so such a row's output is NaN (its term
  is scaled by NaN, not clipped onto a neighbouring adapter). To get an error
  instead, call the jitted forward through :func:`serve`, which checks the ids
  on the host before dispatching.

  Args:
    stack: output of :func:`mos_jax.core.stack_adapters`.
    adapter_ids: ``(batch,)`` int adapter id per row, in ``[-1, K)``.

  Yields:
    Nothing; models called inside the block are adapted row by row.

  Example:
    >>> @jax.jit
    ... def forward(stack, ids, input_ids):
    ...   with inject_multi(stack, ids), jax.numpy_rank_promotion("allow"):
    ...     return model(input_ids, params=params).logits  # doctest: +SKIP
  """
  adapter_ids = jnp.asarray(adapter_ids)
  check_ids(adapter_ids, stack.num_adapters)
  # Only the groups are needed to resolve layers: any target pattern matches no extra module.
  calls = AdaptedCalls(None, stack.groups)
  # Rows with id -1 gather adapter 0's shards (clipped) and are zeroed by their scale; rows with
  # an id outside [-1, K) (possible only when traced) are poisoned with NaN: a clipped id would
  # silently serve the last adapter, a negative one the base model.
  ids = jnp.clip(adapter_ids, 0, stack.num_adapters - 1)
  valid = (adapter_ids >= -1) & (adapter_ids < stack.num_adapters)
  row_scale = jnp.where(valid, jnp.where(adapter_ids >= 0, stack.scale[ids], 0.0), jnp.nan)

  def handle(module, next_fun, args, kwargs):
    found = calls.resolve(module, args, kwargs)
    if found is None:
      return next_fun(*args, **kwargs)
    path, group, layer = found
    if layer is None:  # a stacked group inside nn.scan: the layer comes from the params with_factors gave
      layer = scanned_layer(module, path)
    a, b = row_factors(stack, group, layer, ids)
    x, unflatten = flat_io(module, group, module_input(args, kwargs), args, kwargs)
    if x.shape[0] != ids.shape[0]:
      raise ValueError(f"Layer {path} got input of shape {x.shape}, whose first axis is not the batch of "
                       f"{ids.shape[0]} adapter ids.")
    y = next_fun(*args, **kwargs)
    # The training path's term per row: the scale lands on the r x d_in factor (NaN or 0 rows
    # included), and for r <= 8 h·Bᵀ fuses into the add instead of being written out.
    term = jax.vmap(low_rank_term)(x, a, b, row_scale)
    return y + unflatten(term).astype(y.dtype)

  with intercept_kernel_calls(handle):
    yield
  calls.check_all_hit()


def serve(forward: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a (jitted) multi-adapter forward so that bad adapter ids raise before it runs.

  ``forward(stack, adapter_ids, *args, **kwargs)`` is called only after the ids
  are checked on the host (a 1-D integer array with values in ``[-1, K)``);
  inside ``jit``, :func:`inject_multi` can only turn a bad id into NaN outputs.
  The check costs one device-to-host copy of the ids (they usually come from
  the host anyway).

  Args:
    forward: a function whose first two arguments are the
      :class:`~mos_jax.core.AdapterStack` and the ``(batch,)`` adapter ids.

  Returns:
    The same function, checking the ids first.

  Raises:
    ValueError: (from the wrapped function) an id outside ``[-1, K)``, or ids
      that are not a 1-D integer array.

  Example:
    >>> forward = serve(jax.jit(forward))  # doctest: +SKIP
    >>> logits = forward(stack, np.array([0, 2, -1]), input_ids)  # doctest: +SKIP
  """

  @functools.wraps(forward)
  def checked(stack: AdapterStack, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
    check_ids(np.asarray(adapter_ids), stack.num_adapters)
    return forward(stack, adapter_ids, *args, **kwargs)

  return checked
