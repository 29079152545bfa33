"""The one place that hooks linen modules: an interceptor for the kernel layers MoS knows.

``inject``, ``inject_multi``, ``dequantized_dense`` and ``kernel_layouts`` all run
through :func:`intercept_kernel_calls`; each supported module type says here how
its kernel maps an input to an output (:func:`module_layout`, :func:`flat_io`).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.einsum import EinsumSpec
from mos_jax._src.core.targets import DENSE, KERNEL, Group, KernelLayout, matches

#: HF ``transformers`` GPT-2-style layer that stores its kernel as ``(out, in)``; matched by
#: class name so that ``transformers`` stays an optional dependency.
HF_CONV1D = "FlaxConv1D"
_CONV1D_LAYOUT = KernelLayout(in_axes=(1,), out_axes=(0,), module=HF_CONV1D)
Handler = Callable[[nn.Module, Callable[..., Any], tuple, dict], Any]

#: The interceptors in force, as part of ``jax.jit``'s cache key: flax's interceptor stack is invisible to
#: JAX, so without it a function jitted inside ``with inject(a)`` would keep returning a's output outside
#: the block, and one jitted outside would ignore a later block. Made at import, never inside a trace.
_JIT_KEY = jax.make_user_context(())
_blocks = itertools.count()


def module_input(args: tuple, kwargs: dict) -> jax.Array:
  """The input array of a kernel layer's ``__call__``."""
  return args[0] if args else kwargs["inputs"]


def _is_kernel_layer(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum)) or type(module).__name__ == HF_CONV1D


@contextlib.contextmanager
def intercept_kernel_calls(handle: Handler, *, any_module: bool = False) -> Iterator[None]:
  """Routes each ``__call__`` of a kernel layer through ``handle(module, next_fun, args, kwargs)``.

  Each block is its own ``jax.jit`` cache key (see ``_JIT_KEY``): functions
  jitted inside it are traced for it, not reused from outside or from another block.

  Args:
    handle: returns the layer's output; call ``next_fun(*args, **kwargs)`` for the original.
    any_module: hand every module's ``__call__`` to ``handle``, not only the
      known kernel layers (to record unsupported ones).
  """
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not (any_module or _is_kernel_layer(context.module)):
      return next_fun(*args, **kwargs)
    return handle(context.module, next_fun, args, kwargs)

  # A fresh key per block: its factors are constants of any trace made inside it, so not even a
  # later block of the same adapter may reuse that trace (its pools may have changed).
  with nn.intercept_methods(interceptor), _JIT_KEY((*_JIT_KEY.value, next(_blocks))):
    yield


def _einsum(module: nn.Module, args: tuple, kwargs: dict) -> EinsumSpec:
  # args[0] is the input; the core's one rule picks the equation (the call's, else the module's).
  return EinsumSpec.of_call(module.einsum_str, args[1:], kwargs)


def module_layout(module: nn.Module, kernel_shape: tuple[int, ...], args: tuple = (),
                  kwargs: dict | None = None) -> KernelLayout:
  """How ``module`` applies its kernel, or an unsupported layout naming its class."""
  name = type(module).__name__
  unsupported = KernelLayout(in_axes=(), out_axes=(), module=name, supported=False)
  ndim = len(kernel_shape)
  if isinstance(module, nn.Dense):
    return DENSE
  if name == HF_CONV1D and ndim == 2:
    return _CONV1D_LAYOUT
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return unsupported
    n_in = len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
    return KernelLayout(in_axes=tuple(range(n_in)), out_axes=tuple(range(n_in, ndim)), module=name)
  if isinstance(module, nn.Einsum):
    return _einsum(module, args, kwargs or {}).layout(name)
  return unsupported


def flat_io(module: nn.Module, group: Group, x: jax.Array, args: tuple, kwargs: dict,
            ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """``x`` as ``(..., d_in)`` and the map from a ``(..., d_out)`` term to the layer's output layout."""
  if isinstance(module, nn.Einsum):
    return _einsum(module, args, kwargs).flat_io(x, group)
  if isinstance(module, nn.DenseGeneral):
    n_in = len(group.in_axes)
    # Flax sorts the normalised axes: the kernel's input dims follow the input's axes in ascending order.
    axes = tuple(sorted(a % x.ndim for a in (module.axis if isinstance(module.axis, (tuple, list))
                                             else (module.axis,))))
    moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - n_in, x.ndim)))
    lead = moved.shape[:x.ndim - n_in]
    features = tuple(group.kernel_shape[a] for a in group.out_axes)
    return moved.reshape(lead + (group.d_in,)), lambda t: t.reshape(lead + features)
  return x, lambda t: t


def kernel_shape(module: nn.Module) -> tuple[int, ...]:
  """The shape of the module's ``kernel`` param (a quantized node's too)."""
  return tuple(module.get_variable("params", KERNEL).shape)


class AdaptedCalls:
  """Resolves each intercepted layer to its group and layer, checks it, and tracks which were hit.

  Raises, naming the module, when a layer the adapter targets is of another
  layout or shape than the adapter was made for (another model, or a module
  type such as GPT-2's ``FlaxConv1D`` adapted without its layout), or when a
  layer matching the adapter's targets has no factors (an adapter made for a
  smaller model). :meth:`check_all_hit` then proves every adapted module ran.
  """

  def __init__(self, config: MoSConfig | None, groups: tuple[Group, ...]):
    self.config = config
    # Per-layer groups: one path per layer. A stacked group: its one path, for every layer.
    self.lookup = {p: (g, i) for g in groups for i, p in enumerate(g.paths)}
    self.ordinal = {p: n for n, p in enumerate(sorted(self.lookup))}
    self.hit: set[str] = set()

  def resolve(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[str, Group, int | None] | None:
    if module.is_initializing():
      return None  # shape-only passes (HF's init_cache in generate) have no kernels to check or adapt
    path = "/".join(module.path)
    found = self.lookup.get(path)
    if found is None:
      if (self.config is not None and module.has_variable("params", KERNEL)
          and matches(path, self.config.target_modules)
          and not matches(path, self.config.exclude_modules)):
        raise ValueError(f"Module {path!r} ({type(module).__name__}) matches the adapter's target_modules "
                         "but the adapter has no factors for it: the adapter was made for another model "
                         "(fewer layers?). Use the adapter with the model it was created for.")
      return None
    group, layer = found
    shape = kernel_shape(module)
    layout = module_layout(module, shape, args, kwargs)
    if not layout.supported:
      raise ValueError(f"Module {path!r} is a {layout.module}, which MoS cannot adapt; exclude it.")
    if shape != group.kernel_shape or (layout.in_axes, layout.out_axes) != (group.in_axes, group.out_axes):
      raise ValueError(
          f"Module {path!r} ({layout.module}) has a kernel {shape} applied with in_axes={layout.in_axes}, "
          f"out_axes={layout.out_axes}, but the adapter's group {group.name!r} expects {group.kernel_shape} "
          f"with in_axes={group.in_axes}, out_axes={group.out_axes}. "
          + ("FlaxConv1D stores its kernel as (out, in): build the adapter with "
             "layouts=mos_jax.linen.kernel_layouts(...). " if layout.module == HF_CONV1D else "")
          + "Use the adapter with the model (and layouts) it was created for.")
    self.hit.add(path)
    # A stacked kernel runs inside nn.scan: its layer is the loop's, read from the sliced params.
    return path, group, None if group.stacked else layer

  def check_all_hit(self) -> None:
    missing = sorted(set(self.lookup) - self.hit)
    if missing:
      shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
      raise RuntimeError(
          f"The adapted call never reached these adapted modules: {shown}. Their low-rank terms were not "
          "applied, so training would learn nothing for them. Causes: the model was not called (traced) "
          "inside the `with` block (e.g. a jitted function traced earlier reused its cached trace), the "
          "module is not an nn.Dense/DenseGeneral/Einsum (a custom layer), or the adapter was made for a "
          "bigger model. Call the model inside the block, jit the function that enters it, or exclude "
          "these modules.")
