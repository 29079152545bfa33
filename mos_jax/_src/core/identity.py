"""What makes an adapter belong to one config and one model, as JSON, and how two differ."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import numpy as np

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.targets import Group, path_str


def as_json(value: Any) -> Any:
  """Through JSON and back: tuples become lists, as they will after a save."""
  return json.loads(json.dumps(value))


def tree_layout(tree: Any) -> dict[str, list]:
  """``{"/"-joined leaf path: [shape, dtype name]}`` of a pytree; reads no values."""
  return {path_str(p): [list(np.shape(x)), str(x.dtype)]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def groups_identity(groups: tuple[Group, ...]) -> dict[str, dict[str, Any]]:
  """``{group name: {"paths", "kernel_shape", "in_axes", "out_axes", "num_layers", "layer_axis"}}``."""
  return {g.name: {"paths": list(g.paths), "kernel_shape": list(g.kernel_shape), "in_axes": list(g.in_axes),
                   "out_axes": list(g.out_axes), "num_layers": g.num_layers, "layer_axis": g.layer_axis}
          for g in groups}


def groups_from_identity(stored: Mapping[str, Mapping[str, Any]]) -> tuple[Group, ...]:
  """Inverse of :func:`groups_identity`."""
  return tuple(Group(name=name, paths=tuple(g["paths"]), kernel_shape=tuple(g["kernel_shape"]),
                     in_axes=tuple(g["in_axes"]), out_axes=tuple(g["out_axes"]), num_layers=g["num_layers"],
                     layer_axis=g["layer_axis"]) for name, g in stored.items())


def adapter_identity(adapter: Adapter, *, base_params: Any = None) -> dict[str, Any]:
  """What makes a checkpoint belong to one adapter on one model, as JSON.

  The config (every field, seed included), the routing algorithm's version, a
  hash of the index arrays, each group's member paths and layouts, and, with
  ``base_params``, the base model's layout (leaf paths, shapes and dtypes; not
  its values, which would cost a pass over the whole model).

  Args:
    adapter: the adapter (only its static routing is read).
    base_params: the base params the adapter applies to, or ``None``.

  Returns:
    A JSON-serialisable dict; two adapters are interchangeable iff these are equal.

  Example:
    >>> ident = adapter_identity(adapter, base_params=model.params)  # doctest: +SKIP
  """
  spec = adapter.spec
  ident = {
      "mos_config": dataclasses.asdict(spec.config),
      "routing_version": spec.version,
      "routing_sha256": spec.digest,
      "groups": groups_identity(spec.groups),
  }
  if base_params is not None:
    ident["base_model"] = tree_layout(base_params)
  return as_json(ident)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(value, dict) or not value:
    return {prefix: value}
  out = {}
  for k, v in value.items():
    # Group and leaf paths contain "/" and "*": bracket them to keep the dotted path readable.
    name = f"[{k}]" if any(c in str(k) for c in "/.*[]") else (f".{k}" if prefix else str(k))
    out.update(_flat(v, prefix + name))
  return out


def differences(saved: Mapping[str, Any], live: Mapping[str, Any], *,
                names: tuple[str, str] = ("the checkpoint", "this run")) -> list[str]:
  """Human-readable lines for every entry where two JSON trees differ.

  Args:
    saved: the stored tree.
    live: the tree it is compared with.
    names: how the two are called in the lines.

  Returns:
    One line per differing leaf, in ``live``'s order (then leaves only in ``saved``).

  Example:
    >>> differences({"seed": 0}, {"seed": 1})
    ['seed: the checkpoint has 0, this run has 1']
  """
  a, b = _flat(as_json(saved)), _flat(as_json(live))
  lines = []
  # In the live tree's order, so the callers' most telling entries (config, groups) come first.
  for key in [*b, *(k for k in a if k not in b)]:
    if key not in b:
      lines.append(f"{key}: only in {names[0]} ({a[key]!r})")
    elif key not in a:
      lines.append(f"{key}: only in {names[1]} ({b[key]!r})")
    elif a[key] != b[key]:
      lines.append(f"{key}: {names[0]} has {a[key]!r}, {names[1]} has {b[key]!r}")
  return lines
