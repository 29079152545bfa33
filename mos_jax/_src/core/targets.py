"""Discovery of the kernels to adapt, grouped by module type across layers.

Framework-free: works on any params pytree whose adapted weights are leaves named
``kernel`` (linen, HF Flax, NNX pure dicts). How a kernel maps inputs to outputs
(its *layout*) comes from the backend that will apply it; without one, only 2-D
``(d_in, d_out)`` kernels are accepted, so nothing is ever guessed from a rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Iterable, Mapping

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
    shape: the kernel's shape as the module applies it (one layer's, inside
      ``nn.scan``), when the backend recorded it; ``find_groups`` checks
      ``stacked_modules`` and ``layer_axis`` against it.
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  module: str = "Dense"
  supported: bool = True
  shape: tuple[int, ...] | None = None


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


#: Flax's name for item N of a list of submodules (``self.layers = [Block(), ...]`` gives ``layers_0``,
#: ``layers_1``; unnamed modules made in a loop, ``Block_0``, ``Block_1``).
_LIST_ITEM = re.compile(r"(.+)_(\d+)")


def _type_and_layer(module_path: str) -> tuple[str, tuple[int, ...]]:
  """The module type (layer indices as ``*``) and the layer indices of a module path.

  A layer index is a numeric segment (``layers/3``, HF and NNX lists) or Flax's list item
  ``<name>_<N>`` (``layers_3``, ``h_3``, ``block_3``, ``Block_3``) anywhere but in the last
  segment: that one is the kernel module's own name, where Flax calls two different layers of
  one block ``Dense_0`` and ``Dense_1``.

  Example:
    >>> _type_and_layer("model/layers_3/attn/q"), _type_and_layer("mlp/Dense_1")
    (('model/layers_*/attn/q', (3,)), ('mlp/Dense_1', ()))
  """
  parts = module_path.split("/")
  kind, layer = [], []
  for k, part in enumerate(parts):
    item = _LIST_ITEM.fullmatch(part) if k < len(parts) - 1 else None
    if part.isdigit():
      kind.append("*")
      layer.append(int(part))
    elif item:
      kind.append(f"{item[1]}_*")
      layer.append(int(item[2]))
    else:
      kind.append(part)
  return "/".join(kind), tuple(layer)


def _nearest(name: str, paths: Iterable[str], claimed: set[str]) -> list[str]:
  """Up to 3 module names (path suffixes as long as ``name``) of ``paths`` close to ``name``.

  Modules that no other listed name claimed come first (they are what a wrong name was
  meant for: LLaMA's ``q_proj`` on Gemma 3 finds ``q_einsum``, not the matched ``up_proj``);
  names are compared whole and by their first word (``q_proj`` ~ ``q_einsum``).
  """
  depth = name.count("/") + 1
  suffix = lambda p: "/".join(p.split("/")[-depth:])
  pool = sorted({suffix(p) for p in paths if p not in claimed}) or sorted({suffix(p) for p in paths})
  stem = lambda s: re.split(r"[_./]", s)[0]

  def score(candidate: str) -> float:
    return max(difflib.SequenceMatcher(None, name, candidate).ratio(),
               difflib.SequenceMatcher(None, stem(name), stem(candidate)).ratio())

  return [c for c in sorted(pool, key=lambda c: (-score(c), c))[:3] if score(c) >= 0.2]


def check_names(config: MoSConfig, kernels: Iterable[str], targeted: Iterable[str]) -> None:
  """Raises ``ValueError`` naming every listed module name of ``config`` that matches nothing.

  Each name of a ``target_modules`` or ``exclude_modules`` list must match a
  kernel of the model, and each of ``stacked_modules`` a targeted kernel: a
  list that mixes matching and unmatched names (LLaMA's names on Gemma 3,
  whose attention is ``q_einsum``/``kv_einsum``/``attn_vec_einsum``) would
  otherwise adapt only part of what was asked, silently. One regex is checked
  as a whole (it must match something). The message gives, per unmatched
  name, the closest module names of the model.

  Args:
    config: the adapter config.
    kernels: module paths of every kernel in the model.
    targeted: module paths ``config`` targets (after ``exclude_modules``).
  """
  kernels, targeted = sorted(kernels), sorted(targeted)
  lines = []
  for field, among in (("target_modules", kernels), ("exclude_modules", kernels), ("stacked_modules", targeted)):
    names = getattr(config, field)
    if names is None or isinstance(names, str):
      continue
    claimed = {p for p in among if matches(p, names)}
    for name in names:
      if not any(matches(p, (name,)) for p in among):
        near = _nearest(name, among, claimed)
        lines.append(f"{field} {name!r}: " + (f"closest module names {', '.join(map(repr, near))}" if near
                                              else "no similar module name"))
  if lines:
    leaves = sorted({p.rsplit("/", 1)[-1] for p in kernels})
    raise ValueError(
        f"No module matched {len(lines)} listed name(s)"
        + (" (stacked_modules names must match targeted kernels)" if any(line.startswith("stacked") for line in lines)
           else "")
        + ":\n  - "
        + "\n  - ".join(lines) + "\nEvery listed name must match: a list mixing matching and unmatched names is "
        "refused, never partly applied. Correct the names, or drop the ones this model lacks. Kernel modules of "
        f"this model are named: {', '.join(leaves[:30])}{' ...' if len(leaves) > 30 else ''}.")


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + shape[axis + 1:]


def _stack_advice(path: str, full: tuple[int, ...], axis: int | None, applied: tuple[int, ...] | None,
                  ndim: int) -> str:
  """Why a kernel's per-layer shape is not the one its module applies (``applied``, or only its ``ndim``)."""
  axes = [a for a in (0, 1) if applied is not None and len(full) > a + 1 and _without(full, a) == applied]
  if axis is None and len(full) == ndim + 1:
    return (f"Kernel {path!r} {full} has one more axis than its module applies"
            + (f" ({applied})" if applied else "") + ": it is a stack of layers (nn.scan / nnx.vmap). Declare it "
            "with stacked_modules" + (f" and layer_axis={axes[0]}." if axes else " and its layer_axis."))
  if axis is not None and len(full) == ndim:
    return (f"Kernel {path!r} {full} is declared stacked (layer_axis={axis}), but its module applies the whole "
            "kernel: it is one layer's. Remove it from stacked_modules.")
  if axis is not None:
    return (f"Kernel {path!r} {full} is declared stacked with layer_axis={axis}, leaving {_without(full, axis)} per "
            f"layer, but its module applies a {applied} kernel"
            + (f": its layer axis is {axes[0]}, set layer_axis={axes[0]}." if axes else "."))
  return f"Kernel {path!r} {full}: its module applies a {applied} kernel."


def _layout(path: str, shape: tuple[int, ...], layouts: Mapping[str, KernelLayout] | None, *,
            full: tuple[int, ...] | None = None, axis: int | None = None) -> KernelLayout:
  if layouts is not None:
    layout = layouts.get(path)
    if layout is None:
      raise ValueError(f"Matched kernel {path!r} {shape} was not called by the model when its layouts "
                       "were recorded, so it cannot be adapted. Exclude it with exclude_modules.")
    if not layout.supported:
      raise ValueError(f"Matched kernel {path!r} belongs to a {layout.module} module, which MoS cannot "
                       "adapt (only Dense, DenseGeneral, Einsum-style and HF FlaxConv1D layers). "
                       "Exclude it with exclude_modules.")
    n = len(layout.in_axes + layout.out_axes)
    if layout.shape is not None and tuple(layout.shape) != shape:
      raise ValueError(_stack_advice(path, full or shape, axis, tuple(layout.shape), n))
    if sorted(layout.in_axes + layout.out_axes) != list(range(len(shape))):
      raise ValueError(f"Layout {layout} of {path!r} does not cover its kernel shape {shape}. "
                       + _stack_advice(path, full or shape, axis, None, n))
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

  Layers are told apart by numeric path segments (``layers/3/...``) and by
  Flax's list items (``layers_3/...``, ``h_3/...``; see :func:`_type_and_layer`);
  kernels matching ``config.stacked_modules`` hold all layers along
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
    ValueError: no kernel matched, a listed name matched nothing (see
      :func:`check_names`), a matched kernel cannot be adapted (its module, or
      a rank that needs a layout), a stacked kernel's declared ``layer_axis``
      disagrees with its module or its siblings, or the members of a type
      disagree in shape.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(2)}}
    >>> config = MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"])
    >>> [(g.name, g.num_layers, g.d_in, g.d_out) for g in find_groups(params, config)]
    [('layers/*/q_proj', 2, 8, 4)]
  """
  kernels = {p: tuple(np.shape(k)) for p, k in kernel_leaves(params).items()}
  chosen = {p: shape for p, shape in kernels.items()
            if matches(p, config.target_modules) and not matches(p, config.exclude_modules)}
  check_names(config, kernels, chosen)
  if not chosen:
    sample = ", ".join(sorted(kernels)[:12]) or "(no leaf named 'kernel' at all)"
    raise ValueError(
        f"No module matched target_modules={config.target_modules!r} "
        f"(exclude_modules={config.exclude_modules!r}). Kernels in these params: "
        f"{sample}{' ...' if len(kernels) > 12 else ''}. Fix target_modules: a list of names / "
        "path suffixes, or one regex fullmatched against these paths.")
  check_layer_counts(chosen, config)
  by_type: dict[str, list[tuple[tuple[int, ...], str, tuple[int, ...], KernelLayout, int | None]]] = {}
  for path, shape in chosen.items():
    axis = None
    if matches(path, config.stacked_modules):
      axis = config.layer_axis
      if len(shape) <= axis + 1:
        raise ValueError(f"Stacked kernel {path!r} has shape {shape}: too few dims for a layer axis at "
                         f"{axis} plus a kernel. Check stacked_modules and layer_axis.")
      layer_shape = _without(shape, axis)
    else:
      layer_shape = shape
    layout = _layout(path, layer_shape, layouts, full=shape, axis=axis)
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


def check_layer_counts(chosen: Mapping[str, tuple[int, ...]], config: MoSConfig) -> None:
  """Raises ``ValueError`` if sibling stacked kernels disagree on their layer count at ``layer_axis``.

  Kernels of sibling modules (``layers/mlp/up`` and ``layers/mlp/down``) run in one scan, so they
  hold the same number of layers; disagreeing counts mean a wrong ``layer_axis`` (the message
  says which axis they agree on) or a ``stacked_modules`` entry that is not a stack. Stacks under
  different parents (an encoder's and a decoder's) may differ.
  """
  axis = config.layer_axis
  by_parent: dict[str, dict[str, tuple[int, ...]]] = {}
  for path, shape in chosen.items():
    if matches(path, config.stacked_modules) and len(shape) > axis + 1:
      by_parent.setdefault(path.rpartition("/")[0], {})[path] = shape
  for parent, kernels in sorted(by_parent.items()):
    if len({shape[axis] for shape in kernels.values()}) > 1:
      other = 1 - axis
      agree = all(len(s) > other + 1 for s in kernels.values()) and \
          len({s[other] for s in kernels.values()}) == 1
      counts = ", ".join(f"{p}: {s} -> {s[axis]}" for p, s in sorted(kernels.items()))
      raise ValueError(
          f"The stacked kernels under {parent or 'the root'!r} run in one scan, so they must hold the same number "
          f"of layers along layer_axis={axis}, but they hold {counts}. "
          + (f"Along axis {other} they agree: set layer_axis={other}." if agree else
             "Check layer_axis, and that every stacked_modules entry is a stack of layers."))


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
