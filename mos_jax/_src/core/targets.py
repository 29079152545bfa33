"""Discovery of the kernels to adapt, grouped by module type across layers.

Framework-free: works on any params pytree whose adapted weights are leaves named
``kernel`` (linen, HF Flax, NNX pure dicts). How a kernel maps inputs to outputs
(its *layout*) comes from the backend that will apply it; without one, only 2-D
``(d_in, d_out)`` kernels are accepted, so nothing is ever guessed from a rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import numpy as np

from mos_jax._src.core.config import MoSConfig
from mos_jax._src.errors import MismatchError

KERNEL = "kernel"


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How one layer's kernel acts as a linear map.

  Its ``in_axes`` (contracted with the input) flatten, in kernel order, to
  ``d_in``; its ``out_axes`` (the output features) to ``d_out``. A plain dense
  kernel ``(d_in, d_out)`` is ``in_axes=(0,), out_axes=(1,)``.

  Attributes:
    in_axes: kernel axes contracted with the input.
    out_axes: kernel axes that become output features.
    module: the class that applies the kernel (``"Dense"``, ``"Einsum"``), for messages.
    supported: ``False`` when the backend cannot apply a low-rank term to this
      module (``"Conv"``, a custom module); matching it is an error.
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  module: str = "Dense"
  supported: bool = True


DENSE = KernelLayout(in_axes=(0,), out_axes=(1,))


@dataclasses.dataclass(frozen=True)
class Group:
  """All ``L`` kernels of one module type; they share one pair of pools.

  Attributes:
    name: the type: a member's module path with layer indices replaced by ``*``
      (``"model/layers/*/self_attn/q_proj"``).
    paths: module paths of the ``L`` members, in layer order; a stacked group
      has a single path whose kernel holds all layers along ``layer_axis``.
    kernel_shape: one layer's kernel shape (without the layer axis).
    in_axes: axes of ``kernel_shape`` flattened into ``d_in``.
    out_axes: axes of ``kernel_shape`` flattened into ``d_out``.
    num_layers: ``L``.
    layer_axis: the stacked kernel's layer axis, ``None`` for per-layer kernels.
  """

  name: str
  paths: tuple[str, ...]
  kernel_shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  num_layers: int
  layer_axis: int | None = None

  @property
  def stacked(self) -> bool:
    return self.layer_axis is not None

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.in_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.out_axes)

  @property
  def full_shape(self) -> tuple[int, ...]:
    """The shape of the kernel leaf at each path (the layer axis included when stacked)."""
    if self.layer_axis is None:
      return self.kernel_shape
    s = list(self.kernel_shape)
    s.insert(self.layer_axis, self.num_layers)
    return tuple(s)

  def layer_of(self, path: str) -> int:
    return self.paths.index(path)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a ``jax.tree_util`` key path with "/" (``model/layers/0/q_proj/kernel``)."""
  return "/".join(_key_name(k) for k in path)


def kernel_module(leaf_path: str) -> str | None:
  """The module path of a ``kernel`` leaf's "/"-joined path (``""`` at the top), ``None`` for other leaves.

  Example:
    >>> kernel_module("model/layers/0/q_proj/kernel"), kernel_module("model/norm/scale")
    ('model/layers/0/q_proj', None)
  """
  if leaf_path == KERNEL:
    return ""
  return leaf_path[: -len(KERNEL) - 1] if leaf_path.endswith("/" + KERNEL) else None


def kernel_leaves(params: Any) -> dict[str, Any]:
  """Maps module path -> kernel array for every leaf named ``kernel``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    module = kernel_module(path_str(path))
    if module is not None:
      out[module] = leaf
  return out


def matches(module_path: str, patterns: str | tuple[str, ...] | None) -> bool:
  """Whether a "/"-joined module path matches a target pattern.

  ``patterns`` is one regex (fullmatched against the path, or the path plus
  ``/kernel``) or a tuple of module names / "/"-path suffixes; ``None`` matches
  nothing.

  Example:
    >>> matches("model/layers/0/self_attn/q_proj", ("q_proj",))
    True
  """
  if patterns is None:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, module_path) is not None or \
        re.fullmatch(patterns, f"{module_path}/{KERNEL}") is not None
  return any(module_path == p or module_path.endswith("/" + p) for p in patterns)


def matched_kernels(params: Any, config: MoSConfig) -> dict[str, tuple[int, ...]]:
  """``{module path: kernel shape}`` of every kernel ``config`` targets in ``params``."""
  return {p: tuple(np.shape(k)) for p, k in kernel_leaves(params).items()
          if matches(p, config.target_modules) and not matches(p, config.exclude_modules)}


def _type_and_layer(module_path: str) -> tuple[str, tuple[int, ...]]:
  parts = module_path.split("/")
  layer = tuple(int(p) for p in parts if p.isdigit())
  return "/".join("*" if p.isdigit() else p for p in parts), layer


def _layout(path: str, shape: tuple[int, ...], layouts: Mapping[str, KernelLayout] | None) -> KernelLayout:
  if layouts is not None:
    layout = layouts.get(path)
    if layout is None:
      raise ValueError(f"Matched kernel {path!r} {shape} was not called by the model when its layouts "
                       "were recorded, so it cannot be adapted. Exclude it with exclude_modules.")
    if not layout.supported:
      raise ValueError(f"Matched kernel {path!r} belongs to a {layout.module} module, which MoS cannot "
                       "adapt (only Dense, DenseGeneral, Einsum-style and HF FlaxConv1D layers). "
                       "Exclude it with exclude_modules.")
    if sorted(layout.in_axes + layout.out_axes) != list(range(len(shape))):
      raise ValueError(f"Layout {layout} of {path!r} does not cover its kernel shape {shape}.")
    return layout
  if len(shape) != 2:
    raise ValueError(
        f"Matched kernel {path!r} has shape {shape}. Without the model, only 2-D (d_in, d_out) kernels "
        "are adapted: a kernel of another rank may be a convolution, an attention projection "
        "(DenseGeneral/Einsum) or a stack of layers, and its rank alone does not say which. Pass "
        "layouts=mos_jax.linen.kernel_layouts(...) (linen) to adapt einsum-style kernels, declare "
        "stacked layers with MoSConfig(stacked_modules=...), or exclude it with exclude_modules.")
  return DENSE


def find_groups(params: Any, config: MoSConfig, *,
                layouts: Mapping[str, KernelLayout] | None = None) -> tuple[Group, ...]:
  """Finds the kernels ``config`` targets and groups them by module type.

  Layers are told apart by numeric path segments (``layers/3/...``); kernels
  matching ``config.stacked_modules`` hold all layers along
  ``config.layer_axis``.

  Args:
    params: a Flax params pytree (nested dicts, ``FrozenDict`` or NNX pure dict).
    config: the adapter config whose ``target_modules``/``exclude_modules`` select.
    layouts: ``{module path: KernelLayout}`` recorded by a backend from the
      model itself (e.g. :func:`mos_jax.linen.kernel_layouts`); without it only
      2-D dense kernels are accepted.

  Returns:
    The groups, sorted by name.

  Raises:
    ValueError: no kernel matched, a matched kernel cannot be adapted (its
      module, or a rank that needs a layout), or the members of a type disagree
      in shape.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(2)}}
    >>> [(g.name, g.num_layers, g.d_in, g.d_out) for g in find_groups(params, MoSConfig(rank=2, equivalent_rank=1))]
    [('layers/*/q_proj', 2, 8, 4)]
  """
  chosen = matched_kernels(params, config)
  if not chosen:
    kernels = kernel_leaves(params)
    sample = ", ".join(sorted(kernels)[:12]) or "(no leaf named 'kernel' at all)"
    raise ValueError(
        f"No module matched target_modules={config.target_modules!r} "
        f"(exclude_modules={config.exclude_modules!r}). Kernels in these params: "
        f"{sample}{' ...' if len(kernels) > 12 else ''}. Fix target_modules: a list of names / "
        "path suffixes, or one regex fullmatched against these paths.")
  by_type: dict[str, list[tuple[tuple[int, ...], str, tuple[int, ...], KernelLayout, int | None]]] = {}
  for path, shape in chosen.items():
    axis = None
    if matches(path, config.stacked_modules):
      axis = config.layer_axis
      if len(shape) <= axis + 1:
        raise ValueError(f"Stacked kernel {path!r} has shape {shape}: too few dims for a layer axis at "
                         f"{axis} plus a kernel. Check stacked_modules and layer_axis.")
      layer_shape = shape[:axis] + shape[axis + 1:]
    else:
      layer_shape = shape
    layout = _layout(path, layer_shape, layouts)
    type_name, layer = _type_and_layer(path)
    by_type.setdefault(type_name, []).append((layer, path, layer_shape, layout, axis))
  groups = []
  for type_name, members in sorted(by_type.items()):
    members.sort(key=lambda m: (m[0], m[1]))
    kinds = {(shape, layout.in_axes, layout.out_axes, axis) for _, _, shape, layout, axis in members}
    if len(kinds) != 1:
      detail = ", ".join(f"{p}: {s}" for _, p, s, _, _ in members)
      raise ValueError(f"Modules of type {type_name!r} must share one kernel shape and layout to share "
                       f"pools, got {detail}. Exclude the odd ones with exclude_modules.")
    ((shape, in_axes, out_axes, axis),) = kinds
    paths = tuple(p for _, p, _, _, _ in members)
    if axis is not None and len(paths) > 1:
      raise ValueError(f"Type {type_name!r} has several stacked kernels ({list(paths)}); expected one "
                       "per type.")
    num_layers = chosen[paths[0]][axis] if axis is not None else len(paths)
    groups.append(Group(name=type_name, paths=paths, kernel_shape=shape, in_axes=in_axes,
                        out_axes=out_axes, num_layers=num_layers, layer_axis=axis))
  return tuple(groups)


def check_params(params: Any, config: MoSConfig, groups: tuple[Group, ...], *,
                 what: str = "This adapter") -> None:
  """Raises ``ValueError`` unless ``params`` hold exactly the kernels the groups were made for.

  Compares the targeted kernels' paths and shapes (not values): an adapter made
  for a 6-layer model is refused by a 4-layer one (and the reverse), and a
  kernel of another shape by name. Groups the params hold only in part come
  first in the message: their missing layers are the telling difference.
  """
  have = matched_kernels(params, config)
  partly, absent = [], []
  for g in groups:
    bad = [p for p in g.paths if have.get(p) != g.full_shape]
    lines = [f"{p}: the adapter expects a kernel {g.full_shape}, the params have "
             f"{'none' if p not in have else have[p]}" for p in bad]
    if bad and len(bad) < len(g.paths):
      partly += [f"{g.name}: the adapter has {len(g.paths)} kernels of this type, the params match "
                 f"{len(g.paths) - len(bad)}", *lines]
    else:
      absent += lines
  known = {p for g in groups for p in g.paths}
  extra = [f"{p}: the params have a targeted kernel {have[p]} the adapter has no factors for"
           for p in have if p not in known]
  lines = partly + extra + absent
  if lines:
    shown = "\n  - ".join(lines[:20])
    more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
    raise MismatchError(f"{what} was made for another model or config:\n  - {shown}{more}\n"
                        "Use the base params the adapter was created (or trained) for.")
