"""Injecting an adapter's low-rank terms into a linen model, and recording its kernel layouts."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax.core import KERNEL, Adapter, Factors, KernelLayout, assemble, low_rank_term, require_adapter
from mos_jax.linen._intercept import AdaptedCalls, flat_io, intercept_kernel_calls, module_input, module_layout


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


@contextlib.contextmanager
def inject(adapter: Adapter, *, factors: Factors | None = None,
           dropout_rng: jax.Array | None = None) -> Iterator[None]:
  """Adds ``(α/r)·(dropout(x) @ A_iᵀ) @ B_iᵀ`` to every adapted layer called inside the block.

  Assembles the factors (one gather per pool) and hooks the model's
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` (and HF ``FlaxConv1D``)
  layers through ``nn.intercept_methods``; a layer is found by its module path,
  which equals its params path. ``ΔW`` is never formed. Works with
  ``transformers`` Flax models and under ``jax.jit`` as long as the model is
  called (traced) inside the ``with``. The input is cast to the pools' dtype
  and the term back to the layer's.

  On leaving the block, every adapted module must have been called: a module
  the model never ran through the interceptor (a custom layer, a cached trace)
  raises ``RuntimeError`` naming it, instead of training nothing silently.

  Args:
    adapter: the adapter.
    factors: the adapter's factors as :func:`mos_jax.assemble` gives them, to
      apply instead of assembling them here: one assembly reused across many
      calls, or factors trained directly (the gather-free baseline of the
      benchmarks). Their shapes are checked against the adapter's groups.
    dropout_rng: key for the adapter-input dropout; ``None`` disables dropout
      (evaluation). Each layer folds in its own index.

  Yields:
    Nothing; models called inside the block are adapted.

  Raises:
    ValueError: (during the call) a targeted layer has another shape or layout
      than the adapter's, or matches its targets without having factors.
    RuntimeError: (on exit) an adapted module was never called.
    NotImplementedError: the adapter has stacked (scanned) groups.

  Example:
    >>> with inject(adapter):  # doctest: +SKIP
    ...   logits = model(input_ids, params=params).logits
  """
  config = require_adapter(adapter, "inject").config
  calls = AdaptedCalls(config, adapter.groups)
  factors = assemble(adapter) if factors is None else _checked(factors, adapter)
  use_dropout = dropout_rng is not None and config.dropout > 0.0

  def handle(module, next_fun, args, kwargs):
    found = calls.resolve(module, args, kwargs)
    y = next_fun(*args, **kwargs)
    if found is None:
      return y
    path, group, i = found
    a, b = factors[group.name]["A"][i], factors[group.name]["B"][i]
    x, unflatten = flat_io(module, group, module_input(args, kwargs).astype(a.dtype), args, kwargs)
    if use_dropout:
      x = _dropout(x, config.dropout, jax.random.fold_in(dropout_rng, calls.ordinal[path]))
    return y + unflatten(low_rank_term(x, a, b, config.scale)).astype(y.dtype)

  with intercept_kernel_calls(handle):
    yield
  calls.check_all_hit()


def _checked(factors: Factors, adapter: Adapter) -> Factors:
  r = adapter.config.rank
  for g in adapter.groups:
    want = {"A": (g.num_layers, r, g.d_in), "B": (g.num_layers, g.d_out, r)}
    got = {k: tuple(getattr(factors.get(g.name, {}).get(k), "shape", ())) for k in want}
    if got != want:
      raise ValueError(f"factors[{g.name!r}] has shapes {got}, the adapter needs {want}: pass "
                       "mos_jax.assemble(adapter) of this adapter.")
  return factors


def kernel_layouts(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, KernelLayout]:
  """Records how every kernel layer that ``fn`` calls applies its kernel, allocating nothing.

  Traces ``fn(*args, **kwargs)`` with ``jax.eval_shape`` and notes, for each
  module that owns a ``kernel``, its :class:`~mos_jax.core.KernelLayout`:
  ``nn.Dense`` is ``(d_in, d_out)``; ``nn.DenseGeneral`` contracts its leading
  ``len(axis)`` kernel dims; ``nn.Einsum`` contracts the kernel labels shared
  with the input only; HF ``FlaxConv1D`` stores ``(out, in)``. Any other
  module with a kernel (``nn.Conv``, custom layers) is recorded as
  unsupported, so ``adapt`` refuses it by its class name.

  Args:
    fn: calls the linen model, e.g. ``lambda p: model.apply({"params": p}, x)``.
    *args: arguments of ``fn`` (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: keyword arguments of ``fn``.

  Returns:
    ``{module path: KernelLayout}``, for ``mos_jax.adapt(params, config, layouts=...)``.

  Example:
    >>> layouts = kernel_layouts(lambda p, x: module.apply({"params": p}, x), params, x)  # doctest: +SKIP
    >>> adapter = mos_jax.adapt(params, config, layouts=layouts)  # doctest: +SKIP
  """
  found: dict[str, KernelLayout] = {}

  def record(module: nn.Module, next_fun, args, kw):
    y = next_fun(*args, **kw)
    if module.has_variable("params", KERNEL):
      shape = tuple(module.get_variable("params", KERNEL).shape)
      found["/".join(module.path)] = module_layout(module, shape, args, kw)
    return y

  with intercept_kernel_calls(record, any_module=True):
    jax.eval_shape(lambda a, k: fn(*a, **k), args, kwargs)
  return found


def adapted_loss(loss_fn: Callable[[Any, Any], jax.Array]) -> Callable[..., jax.Array]:
  """Turns a base-model loss into a loss of the adapter.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` that runs the linen model.

  Returns:
    ``f(adapter, params, batch, dropout_rng=None) -> scalar``: ``loss_fn`` with
    the adapter injected; differentiate it with respect to ``adapter``.

  Example:
    >>> loss, grads = jax.value_and_grad(adapted_loss(loss_fn))(adapter, params, batch)  # doctest: +SKIP
  """
  def f(adapter: Adapter, params: Any, batch: Any, dropout_rng: jax.Array | None = None) -> jax.Array:
    with inject(adapter, dropout_rng=dropout_rng):
      return loss_fn(params, batch)
  return f
