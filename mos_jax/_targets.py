"""Discovery of the dense kernels to adapt, grouped by module type across layers."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax

from mos_jax._config import MoSConfig

KERNEL = "kernel"


@dataclasses.dataclass(frozen=True)
class Group:
  """All ``L`` kernels of one module type; they share one pair of pools.

  Attributes:
    name: the type: a member's module path with layer indices replaced by ``*``
      (``"model/layers/*/self_attn/q_proj"``).
    paths: module paths of the ``L`` members, in layer order; a stacked
      (scanned) group has a single path whose kernel has a leading layer axis.
    stacked: whether the kernel is ``(L, d_in, d_out)`` at one path.
    num_layers: ``L``.
    d_in: kernel input features.
    d_out: kernel output features.
  """

  name: str
  paths: tuple[str, ...]
  stacked: bool
  num_layers: int
  d_in: int
  d_out: int


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a ``jax.tree_util`` key path with "/" (``model/layers/0/q_proj/kernel``)."""
  return "/".join(_key_name(k) for k in path)


def kernel_leaves(params: Any) -> dict[str, Any]:
  """Maps module path -> kernel array for every leaf named ``kernel``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = path_str(path)
    if p == KERNEL or p.endswith("/" + KERNEL):
      out[p[: -len(KERNEL) - 1] if "/" in p else ""] = leaf
  return out


def _matches(module_path: str, patterns: str | tuple[str, ...] | None) -> bool:
  if patterns is None:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, module_path) is not None or \
        re.fullmatch(patterns, f"{module_path}/{KERNEL}") is not None
  return any(module_path == p or module_path.endswith("/" + p) for p in patterns)


def _type_and_layer(module_path: str) -> tuple[str, tuple[int, ...]]:
  parts = module_path.split("/")
  layer = tuple(int(p) for p in parts if p.isdigit())
  return "/".join("*" if p.isdigit() else p for p in parts), layer


def find_groups(params: Any, config: MoSConfig) -> tuple[Group, ...]:
  """Finds the kernels ``config`` targets and groups them by module type.

  A 2-D kernel ``(d_in, d_out)`` under a path with a numeric segment
  (``layers/3/...``) is one layer of its type; a 3-D kernel is a stacked
  (``nn.scan``) type with the layer axis first.

  Args:
    params: a Flax params pytree (nested dicts, ``FrozenDict`` or NNX pure dict).
    config: the adapter config whose ``target_modules``/``exclude_modules`` select.

  Returns:
    The groups, sorted by name.

  Raises:
    ValueError: no kernel matched, a matched kernel is neither 2-D nor 3-D, or
      the members of a type disagree in shape.

  Example:
    >>> groups = find_groups(model.params, MoSConfig(rank=8, equivalent_rank=1))  # doctest: +SKIP
  """
  kernels = kernel_leaves(params)
  chosen = {p: k for p, k in kernels.items()
            if _matches(p, config.target_modules) and not _matches(p, config.exclude_modules)}
  if not chosen:
    sample = ", ".join(sorted(kernels)[:12]) or "(no leaf named 'kernel' at all)"
    raise ValueError(
        f"No module matched target_modules={config.target_modules!r} "
        f"(exclude_modules={config.exclude_modules!r}). Dense kernels in these params: "
        f"{sample}{' ...' if len(kernels) > 12 else ''}. Fix target_modules: a list of names / "
        "path suffixes, or one regex fullmatched against these paths.")
  by_type: dict[str, list[tuple[tuple[int, ...], str, tuple[int, ...]]]] = {}
  for path, kernel in chosen.items():
    shape = tuple(kernel.shape)
    if len(shape) not in (2, 3):
      raise ValueError(f"Matched kernel {path!r} has shape {shape}; only 2-D (d_in, d_out) or "
                       "stacked 3-D (L, d_in, d_out) kernels can be adapted. Exclude it with "
                       "exclude_modules.")
    type_name, layer = _type_and_layer(path)
    by_type.setdefault(type_name, []).append((layer, path, shape))
  groups = []
  for type_name, members in sorted(by_type.items()):
    members.sort()
    shapes = {shape for _, _, shape in members}
    if len(shapes) != 1:
      detail = ", ".join(f"{p}: {s}" for _, p, s in members)
      raise ValueError(f"Modules of type {type_name!r} must share one kernel shape to share "
                       f"pools, got {detail}. Exclude the odd ones with exclude_modules.")
    (shape,) = shapes
    stacked = len(shape) == 3
    if stacked and len(members) > 1:
      raise ValueError(f"Type {type_name!r} has several stacked 3-D kernels "
                       f"({[p for _, p, _ in members]}); expected one per type.")
    groups.append(Group(
        name=type_name,
        paths=tuple(p for _, p, _ in members),
        stacked=stacked,
        num_layers=shape[0] if stacked else len(members),
        d_in=shape[-2],
        d_out=shape[-1],
    ))
  return tuple(groups)


def layer_of(groups: tuple[Group, ...]) -> Mapping[str, tuple[str, int]]:
  """Maps each per-layer module path to ``(group name, layer index)``."""
  return {p: (g.name, i) for g in groups if not g.stacked for i, p in enumerate(g.paths)}
