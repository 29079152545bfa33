"""``adapt`` an NNX model (a copy with MoS layers), read its adapter back, and ``merge`` it away."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mos_jax._src.core.adapter import Adapter, adapt as core_adapt, require_adapter
from mos_jax._src.core.assemble import kernel_delta
from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.pools import check_pools
from mos_jax._src.core.targets import check_params
from mos_jax._src.errors import MismatchError
from mos_jax._src.nnx.discover import kernel_modules, kernel_tree
from mos_jax._src.nnx.layers import GroupPools, MoSLayer, MoSModel, MoSStackedLayer


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


def adapt(model: nnx.Module, config: MoSConfig | Adapter, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Returns an adapted copy of an NNX model; the original is left untouched.

  Every targeted ``nnx.Linear``, ``nnx.Einsum`` or einsum module like Tunix's
  (any kernel name; contracted dims flatten to ``d_in``, free dims to ``d_out``)
  is wrapped in a :class:`MoSLayer`. The pools are ``nnx.LoRAParam``, one pair
  per module type shared by reference, so ``nnx.state(model, nnx.LoRAParam)``
  holds exactly the trainable parameters and NNX training code
  (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, Tunix ``PeftTrainer``)
  trains them; the base weights stay ``nnx.Param``. The adapter's spec is static.

  Stacked layers (created with ``nnx.vmap``, run with ``nnx.scan``; declared by
  ``config.stacked_modules``) become :class:`MoSStackedLayer`, and the result is
  a :class:`MoSModel` root that keeps their pools outside the scanned block and
  re-assembles their factors at every call.

  Args:
    model: any NNX model.
    config: a :class:`~mos_jax.MoSConfig` (fresh pools, as :func:`mos_jax.adapt`
      draws them), or an :class:`~mos_jax.Adapter` (e.g. from
      :func:`mos_jax.load_adapter`), whose spec and a copy of whose pools are
      used after checking that it was made for this model (paths, shapes, layouts).
    rngs: stream ``dropout`` for the adapter's input dropout (when ``config.dropout > 0``).

  Returns:
    The adapted model.

  Raises:
    ValueError: no module matched, a matched module cannot be adapted (named by
      class), or the usual shape/pool-size errors of :func:`mos_jax.adapt`.
    MismatchError: an :class:`~mos_jax.Adapter` made for another model.

  Example:
    >>> model = mos_jax.nnx.adapt(gemma, mos_jax.MoSConfig(rank=8, equivalent_rank=1,  # doctest: +SKIP
    ...     target_modules=mos_jax.nnx.GEMMA3_TARGETS))
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)  # doctest: +SKIP
  """
  adapted = nnx.clone(model)
  found = {m.path: m for m in kernel_modules(adapted)}
  tree = kernel_tree(list(found.values()))
  if isinstance(config, Adapter):
    adapter = config
    check_params(tree, adapter.config, adapter.groups, what="This adapter")
    odd = [p for g in adapter.groups for p in g.paths
           if (found[p].layout.in_axes, found[p].layout.out_axes) != (g.in_axes, g.out_axes)]
    if odd:
      raise MismatchError(f"This adapter applies the kernels of {odd[:5]} with another layout (in/out axes) "
                          "than this model's modules do: it was made for another model.")
  else:
    adapter = core_adapt(tree, config, layouts={p: m.layout for p, m in found.items()})
  adapter = adapter.replace(base_params=_base_count(model))
  root_pools, stacked_layers = {}, []
  for g in adapter.groups:
    # Copies: the model must not share buffers with an adapter that a training step may donate.
    pools = GroupPools(jnp.array(adapter.pools[g.name]["A"]), jnp.array(adapter.pools[g.name]["B"]))
    for i, path in enumerate(g.paths):
      m = found[path]
      if g.stacked:
        # The pools stay outside the scanned block (on the root), which nnx.scan would slice.
        wrapped = MoSStackedLayer(m.module, spec=adapter.spec, group=g, kernel_name=m.kernel_name, rngs=rngs)
        root_pools[g.name] = pools
        stacked_layers.append(wrapped)
      else:
        wrapped = MoSLayer(m.module, pools, spec=adapter.spec, group=g, layer=i,
                           kernel_name=m.kernel_name, rngs=rngs)
      _set_child(_get(adapted, m.keys[:-1]), m.keys[-1], wrapped)
  if not stacked_layers:
    return adapted
  root = MoSModel(adapted, root_pools, stacked_layers)
  root.refresh()
  return root


def _inner(model: nnx.Module) -> nnx.Module:
  return model.inner if isinstance(model, MoSModel) else model


def mos_layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], MoSLayer]]:
  """``(keys, layer)`` of every :class:`MoSLayer` (stacked ones included) in the model, in graph order.

  For a model with stacked groups (a :class:`MoSModel`), keys are relative to the wrapped model.
  """
  return [(tuple(keys), m) for keys, m in nnx.iter_modules(_inner(model)) if isinstance(m, MoSLayer)]


def _all_pools(model: nnx.Module) -> dict[str, GroupPools]:
  pools = {m.group.name: m.pools for _, m in mos_layers(model) if m.pools is not None}
  if isinstance(model, MoSModel):
    pools.update(zip(model.names, model.pools))
  return pools


def adapter_of(model: nnx.Module) -> Adapter:
  """The adapter of an adapted model as one :class:`~mos_jax.Adapter` value (a copy of its current pools).

  Use it for the formats and checkpoints of ``mos_jax``: ``mos_jax.save_adapter(path,
  adapter_of(model))``, ``mos_jax.export_peft``, ``TrainCheckpointer``.

  Raises:
    ValueError: the model has no MoS layers.

  Example:
    >>> mos_jax.save_adapter("adapter.safetensors", adapter_of(model))  # doctest: +SKIP
  """
  layers = [m for _, m in mos_layers(model)]
  if not layers:
    raise ValueError("This model has no MoS layers: create it with mos_jax.nnx.adapt(model, config).")
  spec = layers[0].spec
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

  The MoS layers are replaced by their base layers, whose kernels get ``ΔW``
  (computed in float32, cast to the kernel's dtype) in their own layout; no
  ``nnx.LoRAParam`` is left. The adapted model is unchanged.

  Example:
    >>> plain = mos_jax.nnx.merge(model)  # doctest: +SKIP
  """
  merged = nnx.clone(model)
  if isinstance(merged, MoSModel):
    merged.refresh()
  root = _inner(merged)
  for keys, layer in mos_layers(merged):
    a, b = layer.factors()
    kernel = getattr(layer.base, layer.kernel_name)
    w = kernel[...]
    kernel[...] = (w.astype(jnp.float32) + kernel_delta(layer.group, a, b, layer.spec.config.scale)).astype(w.dtype)
    _set_child(_get(root, keys[:-1]), keys[-1], layer.base)
  return root


def unbind(model: nnx.Module) -> tuple[nnx.GraphDef, Adapter, nnx.State]:
  """Splits an adapted model for pure-function training: ``(graphdef, adapter, state)``.

  With :func:`bind` this lets :func:`mos_jax.train.make_step` (or any jax
  transform) train the :class:`~mos_jax.Adapter` value of an NNX model: only
  the adapter is differentiated, ``state`` (the base weights) is a constant.

  Example:
    >>> graphdef, adapter, state = unbind(model)  # doctest: +SKIP
    >>> loss_fn = lambda adapter, state, batch, rng: loss(bind(graphdef, adapter, state, rng=rng), batch)  # doctest: +SKIP
    >>> step = mos_jax.train.make_step(loss_fn, optax.adamw(1e-3))  # doctest: +SKIP
  """
  graphdef, state = nnx.split(model)
  return graphdef, adapter_of(model), state


def bind(graphdef: nnx.GraphDef, adapter: Adapter, state: nnx.State, *,
         rng: jax.Array | None = None) -> nnx.Module:
  """The model of :func:`unbind` with the adapter's pools (traced values allowed).

  Args:
    graphdef: from :func:`unbind`.
    adapter: the (traced) adapter.
    state: from :func:`unbind`, a constant of the step.
    rng: the step's key for the adapter's dropout: ``state`` is constant, so its
      dropout stream would repeat one mask every step. Required when
      ``adapter.config.dropout > 0``.
  """
  # copy=True: fresh Variables of the current trace, so a traced adapter can be written into them.
  model = nnx.merge(graphdef, state, copy=True)
  if adapter.config.dropout > 0:
    if rng is None:
      raise ValueError(f"MoSConfig.dropout={adapter.config.dropout}: pass the step's key, bind(..., rng=rng), "
                       "or every step draws the same dropout mask.")
    nnx.reseed(model, dropout=rng)
  load_pools(model, adapter)
  return model
