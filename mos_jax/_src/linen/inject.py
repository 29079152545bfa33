"""Injecting an adapter's low-rank terms into a linen model, and recording its kernel layouts."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax._src.core.adapter import Adapter, require_adapter
from mos_jax._src.core.assemble import Factors, assemble, low_rank_term
from mos_jax._src.core.stack import AdapterStack
from mos_jax._src.core.targets import KERNEL, KernelLayout
from mos_jax._src.linen.intercept import AdaptedCalls, flat_io, intercept_kernel_calls, module_input, module_layout


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
  called (traced) inside the ``with``. The term is computed in the layer
  input's dtype (the factors are cast to it, products accumulate in float32;
  see :func:`mos_jax.core.low_rank_term`) and added in the layer's output dtype.

  Layers of a stacked group (run by ``nn.scan``) take their factors from the
  params: call the model with :func:`with_factors` ``(params, adapter)``.

  On leaving the block, every adapted module must have been called: a module
  the model never ran through the interceptor (a custom layer) raises
  ``RuntimeError`` naming it, instead of training nothing silently. Each block
  is part of ``jax.jit``'s cache key: a function jitted inside the block is
  traced again outside it (and inside another block), never reusing a trace
  made with another injection state.

  Args:
    adapter: the adapter.
    factors: the adapter's factors as :func:`mos_jax.assemble` gives them, to
      apply instead of assembling them here: one assembly reused across many
      calls, or factors trained directly (the gather-free baseline of the
      benchmarks). Their shapes are checked against the adapter's per-layer
      groups; stacked groups always take theirs from :func:`with_factors`.
    dropout_rng: key for the adapter-input dropout; ``None`` disables dropout
      (evaluation). Each layer folds in its own index.

  Yields:
    Nothing; models called inside the block are adapted.

  Raises:
    ValueError: (during the call) a targeted layer has another shape or layout
      than the adapter's, or matches its targets without having factors.
    RuntimeError: (on exit) an adapted module was never called.

  Example:
    >>> with inject(adapter):  # doctest: +SKIP
    ...   logits = model(input_ids, params=params).logits
  """
  config = require_adapter(adapter, "inject").config
  calls = AdaptedCalls(config, adapter.groups)
  per_layer = any(not g.stacked for g in adapter.groups)
  if per_layer:
    factors = assemble(adapter) if factors is None else _checked(factors, adapter)
  use_dropout = dropout_rng is not None and config.dropout > 0.0

  def handle(module, next_fun, args, kwargs):
    found = calls.resolve(module, args, kwargs)
    y = next_fun(*args, **kwargs)
    if found is None:
      return y
    path, group, i = found
    if i is None:
      a, b, key = _sliced_factors(module, path)
    else:
      a, b, key = factors[group.name]["A"][i], factors[group.name]["B"][i], None
    x, unflatten = flat_io(module, group, module_input(args, kwargs), args, kwargs)
    if use_dropout:
      rng = jax.random.fold_in(dropout_rng, calls.ordinal[path])
      x = _dropout(x, config.dropout, rng if key is None else jax.random.fold_in(rng, key))
    return y + unflatten(low_rank_term(x, a, b, config.scale)).astype(y.dtype)

  with intercept_kernel_calls(handle):
    yield
  calls.check_all_hit()


#: Names of the leaves :func:`with_factors` puts next to a stacked kernel: the layers' ``A``, ``B`` and index.
MOS_A, MOS_B, MOS_LAYER = "mos_a", "mos_b", "mos_layer"


def with_factors(params: Any, adapter: Adapter | AdapterStack) -> Any:
  """Params with each stacked group's factors beside its kernel, for models that ``nn.scan`` their layers.

  A scanned model slices every params leaf along the layer axis, so the factors
  reach each iteration the same way as the kernel: ``mos_a`` ``(r, d_in)``,
  ``mos_b`` ``(d_out, r)`` and ``mos_layer`` (the layer's index) per layer,
  stacked on the group's ``layer_axis`` next to ``kernel``. They are assembled
  here, once, outside the scan (one gather per pool); gradients flow back to the
  pools. :func:`inject` then adds each layer's term from its slice.
  :func:`adapted_loss` and :func:`make_train_step` call this for you. For an
  :class:`~mos_jax.core.AdapterStack` (multi-adapter serving) only ``mos_layer``
  is added: :func:`inject_multi` gathers each row's factors for that layer.

  Args:
    params: the base params (dict or ``FrozenDict``).
    adapter: the adapter, or a stack of adapters; only stacked groups get leaves.

  Returns:
    The params with the extra leaves (the same container type).

  Example:
    >>> with inject(adapter):  # doctest: +SKIP
    ...   y = model.apply({"params": with_factors(params, adapter)}, x)
  """
  serving = isinstance(adapter, AdapterStack)
  groups = adapter.groups if serving else require_adapter(adapter, "with_factors").groups
  stacked = [g for g in groups if g.stacked]
  if not stacked:
    return params
  factors = None if serving else assemble(adapter)
  frozen = isinstance(params, flax.core.FrozenDict)
  tree = flax.core.unfreeze(params)
  for g in stacked:
    node = tree
    for part in g.paths[0].split("/"):
      node = node[part]
    axis = g.layer_axis
    node[MOS_LAYER] = jnp.moveaxis(jnp.arange(g.num_layers, dtype=jnp.int32)[:, None], 0, axis)
    if factors is not None:
      node[MOS_A] = jnp.moveaxis(factors[g.name]["A"], 0, axis)
      node[MOS_B] = jnp.moveaxis(factors[g.name]["B"], 0, axis)
  return flax.core.freeze(tree) if frozen else tree


def scanned_layer(module: nn.Module, path: str) -> jax.Array:
  """Inside ``nn.scan``: the index of the layer running, from the ``mos_layer`` leaf :func:`with_factors` added."""
  if not module.has_variable("params", MOS_LAYER):
    raise ValueError(f"Stacked module {path!r} has no factors in its params: call the scanned model with "
                     "mos_jax.linen.with_factors(params, adapter) inside inject (adapted_loss and make_train_step "
                     "do this).")
  return module.get_variable("params", MOS_LAYER).reshape(())


def _sliced_factors(module: nn.Module, path: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  layer = scanned_layer(module, path)
  if not module.has_variable("params", MOS_A):
    raise ValueError(f"Stacked module {path!r} has a layer index but no factors: with_factors(params, ...) was given "
                     "an AdapterStack; pass the Adapter for inject.")
  return module.get_variable("params", MOS_A), module.get_variable("params", MOS_B), layer


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
  module that owns a ``kernel``, its :class:`~mos_jax.core.KernelLayout` and
  the kernel shape it applies (one layer's inside ``nn.scan``, so ``adapt``
  checks ``stacked_modules`` and ``layer_axis`` against it):
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
      shape = tuple(module.get_variable("params", KERNEL).shape)  # inside nn.scan: one layer's
      found["/".join(module.path)] = dataclasses.replace(module_layout(module, shape, args, kw), shape=shape)
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
    the adapter injected (and, for stacked groups, the params passed through
    :func:`with_factors`); differentiate it with respect to ``adapter``.

  Example:
    >>> loss, grads = jax.value_and_grad(adapted_loss(loss_fn))(adapter, params, batch)  # doctest: +SKIP
  """
  def f(adapter: Adapter, params: Any, batch: Any, dropout_rng: jax.Array | None = None) -> jax.Array:
    with inject(adapter, dropout_rng=dropout_rng):
      return loss_fn(with_factors(params, adapter), batch)
  return f
