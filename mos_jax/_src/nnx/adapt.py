"""``adapt`` an NNX model (a copy with MoS layers), read its adapter back, and ``merge`` it away."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mos_jax._src.core.adapter import Adapter, dry_run as core_dry_run, require_adapter
from mos_jax._src.core.config import LLAMA_TARGETS, MoSConfig
from mos_jax._src.core.pools import check_pools, init_pools
from mos_jax._src.core.routing import make_spec
from mos_jax._src.core.targets import Group, check_params, find_groups, matches
from mos_jax._src.errors import MismatchError
from mos_jax._src.train.step import make_step
from mos_jax._src.nnx.discover import KernelModule, kernel_modules, kernel_tree, quantized_modules, references
from mos_jax._src.nnx.layers import GroupPools, MoSLayer, MoSModel, MoSSplitLayer, MoSStackedLayer, calls_checked
from mos_jax._src.nnx.names import FAMILY_TARGETS, FUSED, family

#: Matches every path: the groups are found by the NNX side, which matches targets on module paths.
_EVERY = ".*"


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int) or not isinstance(parent, nnx.Module):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _get(root: Any, keys: tuple[Any, ...]) -> Any:
  node = root
  for k in keys:
    node = node[k] if isinstance(k, int) or not isinstance(node, nnx.Module) else getattr(node, k)
  return node


def _base_count(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  return sum(x.size for x in jax.tree_util.tree_leaves(state))


def _targets(model: nnx.Module, config: MoSConfig) -> MoSConfig:
  """``config``, with a Tunix model family's own targets when ``target_modules`` is left at its default."""
  names = FAMILY_TARGETS.get(family(model))
  if names is None or config.target_modules != LLAMA_TARGETS:
    return config
  present = {str(keys[-1]) for keys, _ in nnx.iter_modules(model) if keys}
  return dataclasses.replace(config, target_modules=tuple(n for n in names if n in present) or names)


def _check_every_name_matched(config: MoSConfig, paths: list[str]) -> None:
  """Each target name must match a module path: a misspelled or foreign name is an error, not a no-op."""
  if not isinstance(config.target_modules, tuple) or not paths:
    return
  unmatched = [n for n in config.target_modules if not any(matches(p, (n,)) for p in paths)]
  if unmatched:
    names = sorted({p.split("/")[-1] for p in paths})
    near = {n: difflib.get_close_matches(n.split("/")[-1], names, n=3, cutoff=0.4) for n in unmatched}
    raise ValueError(
        f"target_modules names that match no module of this model: "
        + "; ".join(f"{n!r} (nearest: {near[n] or 'none'})" for n in unmatched)
        + f". Its module names: {names[:24]}{' ...' if len(names) > 24 else ''}. Fix target_modules, or "
        "leave it at its default on a Tunix model to get that family's projections.")


def _chosen(model: nnx.Module, config: MoSConfig) -> list[tuple[KernelModule, tuple[Any, ...]]]:
  """The targeted kernel modules, each once (with the first of its paths that is targeted)."""
  paths = references(model)
  chosen, all_paths = [], []
  for m in kernel_modules(model):
    names = paths.get(id(m.module), [m.keys])
    all_paths += ["/".join(map(str, k)) for k in names]
    hit = [k for k in names if matches("/".join(map(str, k)), config.target_modules)
           and not matches("/".join(map(str, k)), config.exclude_modules)]
    if hit:
      chosen.append((dataclasses.replace(m, keys=hit[0], path="/".join(map(str, hit[0]))), hit[0]))
  _check_quantized(model, config)
  _check_every_name_matched(config, all_paths)
  return chosen


def _check_quantized(model: nnx.Module, config: MoSConfig) -> None:
  bad = [(path, cls, attr) for path, cls, attr in quantized_modules(model)
         if matches(path, config.target_modules) and not matches(path, config.exclude_modules)]
  if bad:
    listed = ", ".join(f"{p} ({c}.{a})" for p, c, a in bad[:4])
    raise ValueError(
        f"{len(bad)} targeted modules hold weights already quantized by qwix: {listed}"
        f"{' ...' if len(bad) > 4 else ''}. MoS cannot wrap them (their einsum runs inside qwix, out of its "
        "reach: the pools would get no gradient). Adapt the float model and quantize its base layers in the "
        "same call: mos_jax.nnx.adapt(model, config, quantize='nf4').")


def _split_parts(m: KernelModule, split: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
  """The parts a fused module is split into (``()`` when it is adapted as one map)."""
  parts = split.get(str(m.keys[-1]), ())
  if not parts:
    return ()
  shape = tuple(getattr(m.module, m.kernel_name).shape)
  if 0 not in m.layout.out_axes or shape[0] != len(parts):
    raise ValueError(f"Module {m.path!r} {shape} cannot be split into {parts}: its kernel's first axis must be "
                     f"an output axis of size {len(parts)}. Pass split_fused={{}} to adapt it as one map.")
  return parts


def _entries(chosen: list[tuple[KernelModule, tuple[Any, ...]]], split: Mapping[str, tuple[str, ...]]
             ) -> list[KernelModule]:
  """The kernels the core groups: one per module, or one per part of a split fused module (``<path>/<part>``)."""
  out = []
  for m, _ in chosen:
    parts = _split_parts(m, split)
    if not parts:
      out.append(m)
      continue
    inner = tuple(a - 1 for a in m.layout.in_axes)
    outer = tuple(a - 1 for a in m.layout.out_axes if a != 0)
    layout = dataclasses.replace(m.layout, in_axes=inner, out_axes=outer)
    shape = tuple(getattr(m.module, m.kernel_name).shape)[1:]
    out += [KernelModule(path=f"{m.path}/{p}", keys=m.keys + (p,), module=m.module, kernel_name=m.kernel_name,
                         layout=layout, shape=shape) for p in parts]
  return out


def _split_of(adapter: Adapter, chosen: list[tuple[KernelModule, tuple[Any, ...]]]) -> dict[str, tuple[str, ...]]:
  """Which fused modules an adapter was made with split (read off its group paths)."""
  paths = {p for g in adapter.groups for p in g.paths}
  return {name: parts for name, parts in FUSED.items()
          if any(m.keys[-1] == name and f"{m.path}/{parts[0]}" in paths for m, _ in chosen)}


def _groups(model: nnx.Module, config: MoSConfig, entries: list[KernelModule]) -> tuple[dict[str, Any], tuple[Group, ...]]:
  if not entries:
    found = [m.path for m in kernel_modules(model)]
    raise ValueError(
        f"No module matched target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}). "
        f"Modules with kernels: {found[:12]}{' ...' if len(found) > 12 else ''}. Fix target_modules: a list "
        "of names / path suffixes, or one regex fullmatched against these paths.")
  tree = kernel_tree(entries)
  every = dataclasses.replace(config, target_modules=_EVERY, exclude_modules=None)
  return tree, find_groups(tree, every, layouts={m.path: m.layout for m in entries})


def adapt(model: nnx.Module, config: MoSConfig | Adapter, *, rngs: nnx.Rngs | None = None,
          quantize: Any = None, split_fused: Mapping[str, tuple[str, ...]] | None = None) -> nnx.Module:
  """Returns an adapted copy of an NNX model; the original is left untouched.

  Every targeted ``nnx.Linear``, ``nnx.Einsum`` or einsum module like Tunix's
  (any kernel name; contracted dims flatten to ``d_in``, free dims to ``d_out``)
  is wrapped in a :class:`MoSLayer`. The pools are ``nnx.LoRAParam``, one pair
  per module type shared by reference, so ``nnx.state(model, nnx.LoRAParam)``
  holds exactly the trainable parameters and NNX training code
  (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, Tunix ``PeftTrainer``)
  trains them; the base weights stay ``nnx.Param``. The adapter's spec is static.

  * Targets: on a Tunix model (Gemma 3, Llama 3, Qwen 3) a config that leaves
    ``target_modules`` at its default gets that family's projections
    (:data:`FAMILY_TARGETS`); every name given must match a module.
  * Fused projections (Gemma's ``kv_einsum``, kernel ``(2, K, D, H)``) are split
    into their parts, each its own module type with its own pools, as the paper
    and HF adapt ``k_proj`` and ``v_proj`` (:data:`FUSED`; ``split_fused={}``
    adapts them as one map).
  * A module reached under several names (tied weights) is wrapped once: every
    name sees the same :class:`MoSLayer`.
  * The adapted model checks, at each Python run of its ``__call__`` (once per
    trace under ``jit``), that every MoS layer was called, and raises
    ``RuntimeError`` naming those that were not.
  * ``quantize`` stores the adapted layers' base kernels quantized through qwix
    (QLoRA); the pools stay ``pool_dtype``.

  Stacked layers (created with ``nnx.vmap``, run with ``nnx.scan``; declared by
  ``config.stacked_modules``) become :class:`MoSStackedLayer`, and the result is
  a :class:`MoSModel` root that keeps their pools outside the scanned block and
  re-assembles their factors at every call.

  Args:
    model: any NNX model with float weights.
    config: a :class:`~mos_jax.MoSConfig` (fresh pools, as :func:`mos_jax.adapt`
      draws them), or an :class:`~mos_jax.Adapter` (e.g. from
      :func:`mos_jax.load_adapter`), whose spec and a copy of whose pools are
      used after checking that it was made for this model (paths, shapes, layouts).
    rngs: stream ``dropout`` for the adapter's input dropout (when ``config.dropout > 0``).
    quantize: ``"nf4"``, ``"int8"``, ``"int4"`` or a ``qwix.PtqProvider`` (its rules
      matched against each adapted layer's path): quantize the adapted layers'
      base weights (needs ``mos_jax[tunix]``, which brings qwix). ``None``: float.
    split_fused: ``{module name: part names}`` of fused projections to split
      along their kernel's first axis; default :data:`FUSED` for a config, read
      off the adapter's groups for an adapter.

  Returns:
    The adapted model.

  Raises:
    ValueError: no module matched, a target name matched nothing, a matched
      module cannot be adapted (named by class, or already quantized), or the
      usual shape/pool-size errors of :func:`mos_jax.adapt`.
    MismatchError: an :class:`~mos_jax.Adapter` made for another model.

  Example:
    >>> model = mos_jax.nnx.adapt(gemma, mos_jax.MoSConfig(rank=8, equivalent_rank=1))  # doctest: +SKIP
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)  # doctest: +SKIP
  """
  adapted = nnx.clone(model)
  if isinstance(config, Adapter):
    adapter = config
    chosen = _chosen(adapted, adapter.config)
    split = _split_of(adapter, chosen) if split_fused is None else split_fused
    entries = _entries(chosen, split)
    tree = kernel_tree(entries)
    every = dataclasses.replace(adapter.config, target_modules=_EVERY, exclude_modules=None)
    check_params(tree, every, adapter.groups, what="This adapter")
    layouts = {m.path: m.layout for m in entries}
    odd = [p for g in adapter.groups for p in g.paths
           if (layouts[p].in_axes, layouts[p].out_axes) != (g.in_axes, g.out_axes)]
    if odd:
      raise MismatchError(f"This adapter applies the kernels of {odd[:5]} with another layout (in/out axes) "
                          "than this model's modules do: it was made for another model.")
  else:
    config = _targets(adapted, config)
    chosen = _chosen(adapted, config)
    entries = _entries(chosen, FUSED if split_fused is None else split_fused)
    tree, groups = _groups(adapted, config, entries)
    spec = make_spec(config, groups)
    adapter = Adapter(pools=init_pools(spec), spec=spec)
  adapter = adapter.replace(base_params=_base_count(model))
  root = _wrap(adapted, adapter, chosen, entries, rngs)
  if quantize is not None:
    from mos_jax._src.nnx.quantize import quantize_bases  # qwix is an optional extra
    quantize_bases(mos_layers(root), quantize)
  return root


def _wrap(adapted: nnx.Module, adapter: Adapter, chosen: list[tuple[KernelModule, tuple[Any, ...]]],
          entries: list[KernelModule], rngs: nnx.Rngs | None) -> nnx.Module:
  """Puts a MoS layer in place of every chosen module (under each of its names); the pools shared by type."""
  where = {p: (g, i) for g in adapter.groups for i, p in enumerate(g.paths)}
  # Copies: the model must not share buffers with an adapter that a training step may donate.
  pools = {g.name: GroupPools(jnp.array(adapter.pools[g.name]["A"]), jnp.array(adapter.pools[g.name]["B"]))
           for g in adapter.groups}
  by_module = {}
  for e in entries:
    by_module.setdefault(id(e.module), []).append(e)
  edges = references(adapted, edges=True)
  root_pools, stacked_layers = {}, []
  for m, _ in chosen:
    parts = by_module[id(m.module)]
    if len(parts) > 1 or parts[0].path != m.path:
      groups, layers = zip(*(where[e.path] for e in parts))
      if any(g.stacked for g in groups):
        raise NotImplementedError(f"{m.path!r} is stacked: splitting a fused stacked kernel is not supported; "
                                  "pass split_fused={}.")
      shape = tuple(getattr(m.module, m.kernel_name).shape)
      fused = Group(name=m.path, paths=(m.path,), kernel_shape=shape, in_axes=m.layout.in_axes,
                    out_axes=m.layout.out_axes, num_layers=1)
      wrapped = MoSSplitLayer(m.module, [pools[g.name] for g in groups], spec=adapter.spec, parts=groups,
                              layers=layers, fused=fused, kernel_name=m.kernel_name, rngs=rngs)
    else:
      g, i = where[m.path]
      if g.stacked:
        # The pools stay outside the scanned block (on the root), which nnx.scan would slice.
        wrapped = MoSStackedLayer(m.module, spec=adapter.spec, group=g, kernel_name=m.kernel_name, rngs=rngs)
        root_pools[g.name] = pools[g.name]
        stacked_layers.append(wrapped)
      else:
        wrapped = MoSLayer(m.module, pools[g.name], spec=adapter.spec, group=g, layer=i,
                           kernel_name=m.kernel_name, rngs=rngs)
    for parent, key in edges.get(id(m.module), ()):
      _set_child(parent, key, wrapped)
  if not stacked_layers:
    adapted.__class__ = checked_class(type(adapted))
    return adapted
  root = MoSModel(adapted, root_pools, stacked_layers)
  root.refresh()
  return root


_CHECKED: dict[type, type] = {}


def checked_class(cls: type) -> type:
  """``cls`` with a ``__call__`` that checks every MoS layer was called (one class per base class)."""
  if getattr(cls, "_mos_unchecked", None) is not None or not callable(getattr(cls, "__call__", None)):
    return cls
  if cls not in _CHECKED:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
      with calls_checked(self):
        return cls.__call__(self, *args, **kwargs)

    _CHECKED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_mos_unchecked": cls,
                                                 "__module__": cls.__module__, "__qualname__": cls.__qualname__})
  return _CHECKED[cls]


def _unchecked(model: nnx.Module) -> None:
  cls = getattr(type(model), "_mos_unchecked", None)
  if cls is not None:
    model.__class__ = cls


def _inner(model: nnx.Module) -> nnx.Module:
  return model.inner if isinstance(model, MoSModel) else model


def mos_layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], MoSLayer]]:
  """``(keys, layer)`` of every :class:`MoSLayer` (stacked ones included) in the model, in graph order.

  For a model with stacked groups (a :class:`MoSModel`), keys are relative to the wrapped model.
  """
  return [(tuple(keys), m) for keys, m in nnx.iter_modules(_inner(model)) if isinstance(m, MoSLayer)]


def _all_pools(model: nnx.Module) -> dict[str, GroupPools]:
  pools = {name: p for _, m in mos_layers(model) for name, p in m.pool_items()}
  if isinstance(model, MoSModel):
    pools.update(zip(model.names, model.pools))
  return pools


def _spec_of(model: nnx.Module):
  layers = [m for _, m in mos_layers(model)]
  if not layers:
    raise ValueError("This model has no MoS layers: create it with mos_jax.nnx.adapt(model, config).")
  return layers[0].spec


def adapter_of(model: nnx.Module) -> Adapter:
  """The adapter of an adapted model as one :class:`~mos_jax.Adapter` value (a copy of its current pools).

  Use it for the formats and checkpoints of ``mos_jax``: ``mos_jax.save_adapter(path,
  adapter_of(model))``, ``mos_jax.export_peft``, ``TrainCheckpointer``.

  Raises:
    ValueError: the model has no MoS layers.

  Example:
    >>> mos_jax.save_adapter("adapter.safetensors", adapter_of(model))  # doctest: +SKIP
  """
  spec = _spec_of(model)
  # Copies: a training step that donates the adapter must not delete the model's own pools.
  pools = {name: {"A": jnp.array(p.a[...]), "B": jnp.array(p.b[...])} for name, p in _all_pools(model).items()}
  return Adapter(pools=pools, spec=spec, base_params=_base_count(model)).replace()


def load_pools(model: nnx.Module, adapter: Adapter) -> None:
  """Writes an adapter's pools into an adapted model, in place (e.g. after ``load_adapter``).

  Raises:
    MismatchError: the adapter's spec (config, groups, index arrays) is not the model's.
  """
  check_pools(require_adapter(adapter, "load_pools").pools, adapter.spec)
  layers = [m for _, m in mos_layers(model)]
  if not layers or layers[0].spec != adapter.spec:
    raise MismatchError("The adapter's spec (config, groups or index arrays) is not this model's: "
                        "create the model with mos_jax.nnx.adapt(model, adapter) instead.")
  for name, p in _all_pools(model).items():
    p.a[...] = jnp.array(adapter.pools[name]["A"])  # copies, as in adapt
    p.b[...] = jnp.array(adapter.pools[name]["B"])
  if isinstance(model, MoSModel):
    model.refresh()


def merge(model: nnx.Module) -> nnx.Module:
  """A plain copy of an adapted model with ``W + (α/r)·Aᵀ Bᵀ`` in every adapted kernel.

  The MoS layers are replaced by their base layers (under every name they had),
  whose kernels get ``ΔW`` (computed in float32, cast to the kernel's dtype) in
  their own layout; no ``nnx.LoRAParam`` is left. The adapted model is unchanged.

  Raises:
    ValueError: a base kernel is stored quantized (``adapt(..., quantize=...)``):
      ``ΔW`` cannot be added to it without losing it to rounding.

  Example:
    >>> plain = mos_jax.nnx.merge(model)  # doctest: +SKIP
  """
  merged = nnx.clone(model)
  if isinstance(merged, MoSModel):
    merged.refresh()
  root = _inner(merged)
  edges = references(root, edges=True)
  for keys, layer in mos_layers(merged):
    kernel = getattr(layer.base, layer.kernel_name)
    if not isinstance(kernel, nnx.Variable):
      raise ValueError(f"The base kernel of {'/'.join(map(str, keys))} is stored quantized "
                       f"({type(kernel).__name__}): merging ΔW into it would round it away. Merge into the "
                       "float model: mos_jax.nnx.merge(mos_jax.nnx.adapt(float_model, adapter_of(model))).")
    w = kernel[...]
    kernel[...] = (w.astype(jnp.float32) + layer.delta()).astype(w.dtype)
    for parent, key in edges.get(id(layer), ()):
      _set_child(parent, key, layer.base)
  _unchecked(root)
  return root


@dataclasses.dataclass(frozen=True, eq=False)
class _Frame:
  """The static half of an unbound model: its graph, where its pools go, and what its state must look like.

  Compared by identity (``eq=False``), so ``jit`` caches on it without hashing the graph.
  """

  graphdef: nnx.GraphDef
  spec: Any
  pool_treedef: Any
  pool_order: tuple[tuple[str, str], ...]
  state_treedef: Any
  state_shapes: tuple[tuple[int, ...], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BaseState:
  """The base weights of an unbound model (every variable but its pools), and the static frame to bind them.

  A pytree whose leaves are the base weights: pass it to a jitted step as a
  constant. :func:`bind` checks that it belongs to the graph and adapter bound.

  Attributes:
    state: the ``nnx.State`` of everything but the ``nnx.LoRAParam`` pools.
    frame: static: the graph, the spec and the state's layout.
  """

  state: nnx.State
  frame: _Frame = dataclasses.field(metadata={"static": True})

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self.frame.graphdef


def unbind(model: nnx.Module) -> tuple[nnx.GraphDef, Adapter, BaseState]:
  """Splits an adapted model once for pure-function training: ``(graphdef, adapter, state)``.

  The model's ``nnx.LoRAParam`` pools become the :class:`~mos_jax.Adapter` (a
  copy, made here once), everything else the :class:`BaseState`; :func:`bind`
  puts them back together without copying either. With them,
  :func:`make_train_step` (or :func:`mos_jax.train.make_step`, or any jax
  transform) trains the adapter value: only it is differentiated, the base is a
  constant.

  Example:
    >>> graphdef, adapter, state = unbind(model)  # doctest: +SKIP
    >>> step = mos_jax.nnx.make_train_step(lambda model, batch: loss(model, batch), optax.adamw(1e-3))  # doctest: +SKIP
    >>> adapter, opt_state, loss = step(adapter, opt_state, state, batch, None)  # doctest: +SKIP
  """
  spec = _spec_of(model)
  graphdef, pools, rest = nnx.split(model, nnx.LoRAParam, ...)
  owner = {id(v): (name, k) for name, p in _all_pools(model).items() for k, v in (("A", p.a), ("B", p.b))}
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  order = tuple(owner[id(_reach(model, path))] for path, _ in flat)
  leaves, treedef = jax.tree_util.tree_flatten(pools)
  if len(leaves) != len(order):
    raise ValueError(f"This model has {len(leaves)} nnx.LoRAParam leaves, of which {len(order)} are MoS pools: "
                     "mos_jax.nnx.unbind trains the MoS pools only; remove the other LoRAParams (e.g. qwix LoRA).")
  frame = _Frame(graphdef=graphdef, spec=spec, pool_treedef=treedef, pool_order=order,
                 state_treedef=jax.tree_util.tree_structure(rest),
                 state_shapes=tuple(tuple(x.shape) for x in jax.tree_util.tree_leaves(rest)))
  return graphdef, adapter_of(model), BaseState(state=rest, frame=frame)


def _reach(root: Any, keys: tuple[Any, ...]) -> Any:
  node = root
  for k in keys:
    node = node[k] if isinstance(k, int) or not isinstance(node, nnx.Module) else getattr(node, k)
  return node


def bind(graphdef: nnx.GraphDef, adapter: Adapter, state: BaseState, *,
         rng: jax.Array | None = None) -> nnx.Module:
  """The model of :func:`unbind` whose pools are the adapter's arrays (traced values allowed); nothing is copied.

  Args:
    graphdef: from :func:`unbind`.
    adapter: the (traced) adapter, made with the model's spec.
    state: the :class:`BaseState` from :func:`unbind`, a constant of the step.
    rng: the step's key for the adapter's dropout: ``state`` is constant, so its
      dropout stream would repeat one mask every step. Required when
      ``adapter.config.dropout > 0``.

  Raises:
    TypeError: ``state`` is not a :class:`BaseState` (e.g. a plain ``nnx.State``).
    MismatchError: ``state`` was unbound from another model, or its arrays were
      changed to other shapes, or the adapter was made for another spec.
  """
  require_adapter(adapter, "bind")
  if not isinstance(state, BaseState):
    raise TypeError(f"bind takes the state that mos_jax.nnx.unbind returned (a BaseState), got "
                    f"{type(state).__name__}: a state from nnx.split or another model cannot be checked against "
                    "this graph. Use `graphdef, adapter, state = mos_jax.nnx.unbind(model)`.")
  frame = state.frame
  if frame.graphdef is not graphdef and frame.graphdef != graphdef:
    raise MismatchError("This state was unbound from another model than this graphdef: pass the graphdef and "
                        "state of the same mos_jax.nnx.unbind(model) call.")
  if adapter.spec is not frame.spec and adapter.spec != frame.spec:
    raise MismatchError("The adapter's spec (config, groups or index arrays) is not this model's: bind an "
                        "adapter made for it (mos_jax.nnx.unbind's, or one trained from it).")
  leaves, treedef = jax.tree_util.tree_flatten(state.state)
  shapes = tuple(tuple(x.shape) for x in leaves)
  if treedef != frame.state_treedef or shapes != frame.state_shapes:
    bad = [i for i, (a, b) in enumerate(zip(shapes, frame.state_shapes)) if a != b]
    raise MismatchError(f"The state's arrays are not those unbind returned ({len(leaves)} leaves vs "
                        f"{len(frame.state_shapes)}; leaves with other shapes: {bad[:5]}): rebuild it with "
                        "mos_jax.nnx.unbind(model).")
  pools = jax.tree_util.tree_unflatten(frame.pool_treedef, [adapter.pools[g][k] for g, k in frame.pool_order])
  # Fresh Variable objects (the arrays are shared): the stacked layers' factors and the dropout streams are set
  # inside the caller's trace, and a Variable made outside it cannot be mutated there (nor may the state change).
  model = nnx.merge(graphdef, pools, state.state, copy=True)
  if adapter.config.dropout > 0:
    if rng is None:
      raise ValueError(f"MoSConfig.dropout={adapter.config.dropout}: pass the step's key, bind(..., rng=rng), "
                       "or every step draws the same dropout mask.")
    nnx.reseed(model, dropout=rng)
  return model


def make_train_step(loss_fn: Any, optimizer: Any, **shardings: Any) -> Any:
  """A jitted optax step that trains the :class:`~mos_jax.Adapter` of an unbound NNX model.

  The NNX twin of :func:`mos_jax.linen.make_train_step`, built on the one
  :func:`mos_jax.train.make_step`: the model is bound from the adapter and the
  base state inside the step (no copies), only the adapter is differentiated.

  Args:
    loss_fn: ``loss_fn(model, batch) -> scalar`` that runs the adapted model.
    optimizer: any optax transformation; ``optimizer.init(adapter)`` gives its state.
    **shardings: ``trainable_sharding``, ``opt_state_sharding``,
      ``params_sharding`` (for the :class:`BaseState`), ``batch_sharding`` for a
      sharded (pjit) step; see :func:`mos_jax.train.make_step`.

  Returns:
    ``step(adapter, opt_state, state, batch, rng) -> (adapter, opt_state, loss)``,
    ``state`` from :func:`unbind`; ``rng`` (the dropout key) may be ``None`` without dropout.

  Example:
    >>> graphdef, adapter, state = mos_jax.nnx.unbind(model)  # doctest: +SKIP
    >>> step = make_train_step(lambda m, batch: loss(m(batch)), optax.adamw(1e-3))  # doctest: +SKIP
    >>> adapter, opt_state, loss = step(adapter, optax.adamw(1e-3).init(adapter), state, batch, None)  # doctest: +SKIP
  """
  def trainable_loss(adapter: Adapter, state: BaseState, batch: Any, rng: Any) -> jax.Array:
    return loss_fn(bind(state.graphdef, adapter, state, rng=rng), batch)

  return make_step(trainable_loss, optimizer, **shardings)


def dry_run(model: nnx.Module, config: MoSConfig, *,
            split_fused: Mapping[str, tuple[str, ...]] | None = None) -> str:
  """Lists what ``adapt(model, config)`` would wrap and create (paths, shapes, pool sizes), allocating nothing.

  Targets, fused splits and errors are those of :func:`adapt`.

  Example:
    >>> print(mos_jax.nnx.dry_run(gemma, mos_jax.MoSConfig(rank=8, equivalent_rank=1)))  # doctest: +SKIP
  """
  config = _targets(model, config)
  entries = _entries(_chosen(model, config), FUSED if split_fused is None else split_fused)
  tree, _ = _groups(model, config, entries)
  rest = _base_count(model) - sum(x.size for x in jax.tree_util.tree_leaves(kernel_tree(_whole(entries))))
  tree["~other params"] = jax.ShapeDtypeStruct((max(rest, 0),), jnp.float32)
  every = dataclasses.replace(config, target_modules=_EVERY, exclude_modules=None)
  table = core_dry_run(tree, every, layouts={m.path: m.layout for m in entries})
  wrapped = [f"  {m.path}: {type(m.module).__name__}.{m.kernel_name} {tuple(getattr(m.module, m.kernel_name).shape)}"
             + (f" -> {', '.join(e.path.split('/')[-1] for e in entries if e.module is m.module)}"
                if sum(e.module is m.module for e in entries) > 1 else "")
             for m in _whole(entries)]
  return "\n".join([f"target_modules={config.target_modules!r}", f"wraps {len(wrapped)} modules:", *wrapped,
                    table[table.index("MoS adapter:"):]])


def _whole(entries: list[KernelModule]) -> list[KernelModule]:
  """One entry per module (the parts of a split module count its kernel once)."""
  seen, out = set(), []
  for e in entries:
    if id(e.module) not in seen:
      seen.add(id(e.module))
      keys = e.keys if e.shape is None else e.keys[:-1]
      out.append(dataclasses.replace(e, shape=None, keys=keys, path="/".join(map(str, keys))))
  return out
