"""Which layers of an NNX model MoS can adapt, and how each applies its kernel."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from mos_jax._src.core.einsum import EinsumSpec
from mos_jax._src.core.targets import DENSE, KERNEL, KernelLayout


@dataclasses.dataclass(frozen=True)
class KernelModule:
  """A module of the model that owns a kernel.

  Attributes:
    path: "/"-joined module path (``layers/3/attn/q_einsum``).
    keys: the same path as attribute names / list indices, to reach and replace it.
    module: the module.
    kernel_name: its kernel attribute (``kernel`` for ``nnx.Linear``, ``w`` for Tunix ``Einsum``).
    layout: how it applies the kernel (``supported=False`` for modules MoS cannot adapt).
    shape: the kernel shape this entry stands for, when not the module's whole kernel (a part of a fused one).
  """

  path: str
  keys: tuple[Any, ...]
  module: nnx.Module
  kernel_name: str
  layout: KernelLayout
  shape: tuple[int, ...] | None = None


def _params(module: nnx.Module) -> dict[str, nnx.Param]:
  return {k: v for k, v in vars(module).items() if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)}


def _describe(module: nnx.Module) -> tuple[str, KernelLayout] | None:
  params, name = _params(module), type(module).__name__
  if isinstance(module, nnx.Linear):
    return KERNEL, DENSE
  einsum = getattr(module, "einsum_str", None)
  if isinstance(einsum, str) and len(params) >= 1:
    # nnx.Einsum (kernel + optional bias) or an einsum module like Tunix/gemma's (one weight `w`).
    weights = [k for k in params if k != "bias"]
    if len(weights) == 1:
      return weights[0], EinsumSpec.parse(einsum).layout(name)
  if KERNEL in params:
    return KERNEL, KernelLayout(in_axes=(), out_axes=(), module=name, supported=False)
  return None


def kernel_modules(model: nnx.Module) -> list[KernelModule]:
  """Every module of ``model`` that owns a kernel, with its layout, in graph order.

  ``nnx.Linear`` is dense ``(d_in, d_out)``; modules with an ``einsum_str`` and
  one weight (``nnx.Einsum``, Tunix/gemma ``Einsum``) are factorised by their
  equation; any other module with a ``kernel`` (``nnx.Conv``, custom layers)
  is listed as unsupported, so targeting it fails by its class name.

  Example:
    >>> [m.path for m in kernel_modules(model)][:2]  # doctest: +SKIP
    ['layers/0/attn/q_einsum', 'layers/0/attn/kv_einsum']
  """
  out = []
  for keys, module in nnx.iter_modules(model):
    found = _describe(module)
    if found is not None:
      out.append(KernelModule(path="/".join(str(k) for k in keys), keys=tuple(keys), module=module,
                              kernel_name=found[0], layout=found[1]))
  return out


def kernel_tree(found: list[KernelModule]) -> dict[str, Any]:
  """A params-like tree ``{..path..: {"kernel": ShapeDtypeStruct}}`` that the core's discovery reads."""
  tree: dict[str, Any] = {}
  for m in found:
    node = tree
    for k in m.keys:
      node = node.setdefault(str(k), {})
    value = getattr(m.module, m.kernel_name)
    node[KERNEL] = jax.ShapeDtypeStruct(tuple(value.shape) if m.shape is None else m.shape, value.dtype)
  return tree


def references(model: nnx.Module, *, edges: bool = False) -> dict[int, list]:
  """Every reference to every module of the graph, shared ones included (``nnx.iter_modules`` lists each once).

  Returns:
    ``{id(module): [keys, ...]}`` (each path from the root), or with ``edges=True``
    ``{id(module): [(parent, key), ...]}`` (each place that holds it).
  """
  out: dict[int, list] = {}
  stack: list[tuple[tuple[Any, ...], Any]] = [((), model)]
  seen = {id(model)}
  while stack:
    keys, node = stack.pop()
    impl = nnx.graph.get_node_impl(node)
    if impl is None:
      continue
    children = [(k, c) for k, c in impl.node_dict(node).items() if isinstance(c, nnx.Module) or
                (nnx.graph.is_graph_node(c) and not isinstance(c, nnx.Variable))]
    for key, child in reversed(children):
      out.setdefault(id(child), []).append((node, key) if edges else keys + (key,))
      if id(child) not in seen:
        seen.add(id(child))
        stack.append((keys + (key,), child))
  if not edges:
    for paths in out.values():
      paths.sort(key=lambda k: tuple(str(x) for x in k))
  return out


def _quantized_weight(value: Any) -> bool:
  # qwix's WithAux (a quantized array and how it was quantized) replaces a weight's nnx.Param after PTQ.
  return not isinstance(value, nnx.Variable) and hasattr(value, "array") and hasattr(value, "how")


def quantized_modules(model: nnx.Module) -> list[tuple[str, str, str]]:
  """``(path, class, attribute)`` of every module holding a weight already quantized by qwix."""
  return [("/".join(map(str, keys)), type(m).__name__, name) for keys, m in nnx.iter_modules(model)
          for name, value in vars(m).items() if _quantized_weight(value)]
