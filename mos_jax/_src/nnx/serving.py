"""Serving many MoS adapters in one batch of an NNX model: a per-row adapter id, generation through a sampler."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax._src.core.einsum import EinsumSpec
from mos_jax._src.core.stack import AdapterStack, RowPlan, plan_rows, require_stack, rows_term
from mos_jax._src.core.targets import Group
from mos_jax._src.errors import MismatchError
from mos_jax._src.nnx.adapt import adapter_entries, fused_group, mos_layers, set_child
from mos_jax._src.nnx.discover import references
from mos_jax._src.nnx.layers import MoSModel


class StackArray(nnx.Variable):
  """An array of the served :class:`~mos_jax.core.AdapterStack` (pools, routing, scales): served, not trained."""


class RowArray(nnx.Variable):
  """An array of the current batch's plan (:func:`mos_jax.core.plan_rows`) (which adapter each row uses)."""


_PLAN_FIELDS = ("ids", "use", "bad", "slots", "slot")


class ServedStack(nnx.Module):
  """The adapter stack every :class:`MultiMoSLayer` of a served model shares, and the current batch's rows.

  One object referenced by every layer, so it is one set of variables through
  ``nnx.split``/``merge`` and Tunix's ``Sampler``. The stack's arrays are
  variables (a stack of the same shapes is swapped in with
  :func:`mos_jax.nnx.load_pools` without recompiling); so are the rows, written by
  :func:`set_adapter_ids`.
  """

  def __init__(self, stack: AdapterStack):
    self.groups = stack.groups
    self.rank = stack.rank
    self.target_modules = stack.target_modules
    self.exclude_modules = stack.exclude_modules
    self.names = tuple(g.name for g in stack.groups)
    self.pool_a = nnx.List([StackArray(jnp.array(stack.pools[n]["A"])) for n in self.names])
    self.pool_b = nnx.List([StackArray(jnp.array(stack.pools[n]["B"])) for n in self.names])
    self.index_a = nnx.List([StackArray(jnp.asarray(stack.index_a[n])) for n in self.names])
    self.index_b = nnx.List([StackArray(jnp.asarray(stack.index_b[n])) for n in self.names])
    self.scale = StackArray(jnp.asarray(stack.scale))
    empty = plan_rows(np.zeros((0,), np.int32), stack.num_adapters)  # no rows until set_adapter_ids
    for field in _PLAN_FIELDS:
      setattr(self, field, RowArray(getattr(empty, field)))
    self.segment_max = empty.segment_max  # static: a new value recompiles

  @property
  def num_adapters(self) -> int:
    return int(self.scale[...].shape[0])

  def group_stack(self, group: Group) -> AdapterStack:
    """The one-group :class:`~mos_jax.core.AdapterStack` of ``group``, of the current arrays."""
    i = self.names.index(group.name)
    return AdapterStack(pools={group.name: {"A": self.pool_a[i][...], "B": self.pool_b[i][...]}},
                        index_a={group.name: self.index_a[i][...]}, index_b={group.name: self.index_b[i][...]},
                        scale=self.scale[...], groups=(group,), rank=self.rank)

  def plan(self) -> RowPlan:
    return RowPlan(**{field: getattr(self, field)[...] for field in _PLAN_FIELDS}, segment_max=self.segment_max)


class MultiMoSLayer(nnx.Module):
  """A layer of the base model plus each batch row's own adapter term: ``base(x)_b + (α_k/r)·(x_b A_kᵀ) B_kᵀ``.

  Row ``b`` uses the adapter the served model's rows name (:func:`set_adapter_ids`;
  ``-1``: the base model only). The factors are gathered from the stacked pools
  (per row, or once per adapter when few serve the batch); ``ΔW`` is never formed. Inference only.
  A fused projection split into parts (Gemma's ``kv_einsum``: ``k``, ``v``) adds each part's
  term along its kernel's first axis, as :class:`~mos_jax.nnx.MoSLayer`'s split form does.

  Attributes:
    base: the wrapped layer, unchanged.
    served: the shared :class:`ServedStack`.
    parts: the module type of each part (one for an unsplit layer).
    layers: this layer's index in each part's group.
    io: the group whose layout flattens the layer's input and output (the whole fused kernel when split).
  """

  def __init__(self, base: nnx.Module, served: ServedStack, *, parts: tuple[Group, ...], layers: tuple[int, ...],
               io: Group, path: str):
    self.base = base
    self.served = served
    self.parts = tuple(parts)
    self.layers = tuple(layers)
    self.io = io
    self.path = path

  def __getattr__(self, name: str) -> Any:
    # Models read their layers' attributes (Tunix reads `attn_vec_einsum.shape`): the base layer's.
    base = self.__dict__.get("base")
    if base is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(base, name)

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base(x, *args, **kwargs)
    plan = self.served.plan()
    flat, unflatten = jnp.asarray(x), lambda t: t
    spec = EinsumSpec.of_call(getattr(self.base, "einsum_str", None), args, kwargs)
    if spec is not None:
      flat, unflatten = spec.flat_io(flat, self.io)
    if flat.shape[0] != plan.ids.shape[0]:
      raise ValueError(f"Layer {self.path} got an input of shape {tuple(flat.shape)}, whose first axis is not the "
                       f"batch of {plan.ids.shape[0]} adapter ids: call mos_jax.nnx.set_adapter_ids(model, ids) "
                       "with one id per row of the batch first (or generate through mos_jax.nnx.serve).")
    terms = [rows_term(self.served.group_stack(g), g, i, plan, flat) for g, i in zip(self.parts, self.layers)]
    return y + unflatten(jnp.concatenate(terms, axis=-1)).astype(y.dtype)


def _served(model: nnx.Module) -> ServedStack:
  for _, module in nnx.iter_modules(model):
    if isinstance(module, ServedStack):
      return module
  raise ValueError("This model serves no adapter stack: make it with mos_jax.nnx.adapt_multi(model, stack).")


def adapt_multi(model: nnx.Module, stack: AdapterStack) -> nnx.Module:
  """A copy of a base NNX model whose rows each run their own adapter of ``stack`` (``-1``: none).

  The NNX counterpart of :func:`mos_jax.linen.inject_multi`: every layer the
  stack's adapters adapted becomes a :class:`MultiMoSLayer` that adds, for each
  batch row, the term of the adapter :func:`set_adapter_ids` names for it. The
  original model is left untouched; the stack is copied into the model (swap in
  another stack of the same shapes with :func:`mos_jax.nnx.load_pools`, without recompiling).
  Generate with Tunix's ``Sampler`` through :func:`serve`.

  Args:
    model: the base NNX model the adapters were made for (not an adapted one).
    stack: from :func:`mos_jax.core.stack_adapters` (e.g. of ``mos_jax.nnx.adapter_of``
      or ``mos_jax.load_adapter`` adapters).

  Returns:
    The served model.

  Raises:
    TypeError: ``stack`` is not an :class:`~mos_jax.core.AdapterStack` (a single Adapter: stack it).
    MismatchError: the stack was made for another model (paths, kernel shapes, layouts,
      or a module its targets match that it has no factors for).
    ValueError: ``model`` already has MoS layers.
    NotImplementedError: a stacked (``nnx.scan``) group.

  Example:
    >>> stack = mos_jax.core.stack_adapters([adapter_of(m) for m in tuned])  # doctest: +SKIP
    >>> served = mos_jax.nnx.adapt_multi(base_model, stack)  # doctest: +SKIP
    >>> out = mos_jax.nnx.serve(Sampler(served, tokenizer, cache_config), prompts, [0, 3, -1])  # doctest: +SKIP
  """
  stack = require_stack(stack, "adapt_multi")
  if isinstance(model, MoSModel) or mos_layers(model) or any(isinstance(m, MultiMoSLayer)
                                                            for _, m in nnx.iter_modules(model)):
    raise ValueError("adapt_multi takes the base model, and this one already has MoS layers: pass the model "
                     "you adapted (or mos_jax.nnx.merge(model) to serve on top of a merged adapter).")
  stacked = [g.name for g in stack.groups if g.stacked]
  if stacked:
    raise NotImplementedError(f"Groups {stacked} are stacked (nnx.scan): serving many adapters on a scanned NNX "
                              "model is not supported yet; serve an unrolled copy of the model.")
  served_model = nnx.clone(model)
  # The stack names its targets, so a bigger model's extra matching module is refused here too.
  chosen, entries = adapter_entries(served_model, stack, stack.groups, what="This adapter stack")
  where = {p: (g, i) for g in stack.groups for i, p in enumerate(g.paths)}
  served = ServedStack(stack)
  edges = references(served_model, edges=True)
  for m, _ in chosen:
    parts = [e for e in entries if e.module is m.module]
    groups, layers = zip(*(where[e.path] for e in parts))
    split = len(parts) > 1 or parts[0].path != m.path
    wrapped = MultiMoSLayer(m.module, served, parts=groups, layers=layers, io=fused_group(m) if split else groups[0],
                            path=m.path)
    for parent, key in edges.get(id(m.module), ()):  # a tied module: wrapped once, under each of its names
      set_child(parent, key, wrapped)
  return served_model


def set_adapter_ids(model: nnx.Module, adapter_ids: Any) -> RowPlan:
  """Names the adapter of each row of the next batches of a served model, in place; checked on the host.

  Args:
    model: from :func:`adapt_multi` (or a Tunix ``Sampler``'s model: its variables are the model's).
    adapter_ids: ``(batch,)`` ids of any integer dtype in ``[-1, K)`` (``-1``: the base model), or a
      plan (:func:`mos_jax.core.plan_rows`).

  Returns:
    The plan written (segmented when few adapters serve the batch, see :func:`mos_jax.core.plan_rows`).

  Raises:
    ValueError: ids that are not a 1-D integer array, an id outside ``[-1, K)``, or a model that serves
      no stack.

  Example:
    >>> set_adapter_ids(served, np.array([2, -1, 0]))  # doctest: +SKIP
    >>> logits, _ = served(tokens, positions, None, mask)  # doctest: +SKIP
  """
  served = _served(model)
  plan = adapter_ids if isinstance(adapter_ids, RowPlan) else plan_rows(np.asarray(adapter_ids), served.num_adapters)
  for field in _PLAN_FIELDS:
    getattr(served, field).set_value(getattr(plan, field))
  served.segment_max = plan.segment_max
  return plan


def load_stack(model: nnx.Module, stack: AdapterStack) -> None:
  """Writes another stack of the same shapes (other adapters, or more trained ones) into a served model.

  Raises:
    MismatchError: the stack's groups, rank or array shapes are not the served model's.
  """
  stack = require_stack(stack, "load_stack")
  served = _served(model)
  new = ServedStack(stack)
  same = (new.groups == served.groups and new.rank == served.rank
          and jax.tree_util.tree_structure(nnx.state(new, StackArray)) ==
          jax.tree_util.tree_structure(nnx.state(served, StackArray))
          and all(np.shape(a) == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(nnx.state(new, StackArray)),
                                                            jax.tree_util.tree_leaves(nnx.state(served, StackArray)))))
  if not same:
    raise MismatchError("This stack's groups, rank or shapes (number of adapters included) are not the served "
                        "model's: make a new served model with adapt_multi(model, stack).")
  nnx.update(served, nnx.state(new, StackArray))


def serve(sampler: Any, prompts: Sequence[str], adapter_ids: Any, **kwargs: Any) -> Any:
  """Generates from a batch of prompts, row ``b`` with adapter ``adapter_ids[b]``, through Tunix's ``Sampler``.

  The ids are checked on the host first (a bad id raises before anything runs), written into the
  sampler's model (:func:`set_adapter_ids`), and the sampler runs as usual: one prefill and its
  KV-cache decoding loop over the whole mixed batch, compiled once per batch shape and per number of
  distinct adapters (up to 1, 2, 4, 8 or 16, and more: :func:`mos_jax.core.plan_rows`).

  Args:
    sampler: a ``tunix.generate.sampler.Sampler`` made over a model of :func:`adapt_multi`.
    prompts: the prompts, one per row.
    adapter_ids: one id per prompt, any integer dtype, in ``[-1, K)`` (``-1``: the base model).
    **kwargs: the sampler's own arguments (``max_generation_steps``, ``temperature``, ``eos_tokens``, ...).

  Returns:
    The sampler's output (``.text``, ``.tokens`` per row).

  Raises:
    ValueError: bad ids, or not one id per prompt; a sampler whose model serves no stack.
    NotImplementedError: ``beam_size`` (beams multiply the rows after the prefill).

  Example:
    >>> sampler = Sampler(mos_jax.nnx.adapt_multi(model, stack), tokenizer, cache_config)  # doctest: +SKIP
    >>> out = serve(sampler, ["Hi", "Hello"], [0, -1], max_generation_steps=16)  # doctest: +SKIP
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if kwargs.get("beam_size") is not None:
    raise NotImplementedError("serve does not support beam_size: beam search repeats each row after the prefill, "
                              "so the rows' adapter ids would no longer line up.")
  ids = np.asarray(adapter_ids)
  if ids.ndim != 1 or ids.shape[0] != len(prompts):
    raise ValueError(f"serve needs one adapter id per prompt: {len(prompts)} prompts, ids of shape {ids.shape}.")
  if not hasattr(sampler, "transformer"):
    raise ValueError(f"serve takes a Tunix Sampler (with a .transformer), got {type(sampler).__name__}.")
  # The sampler's .transformer is rebuilt from the very Variable objects it runs with: writing the rows
  # there writes them into the sampler.
  set_adapter_ids(sampler.transformer, ids)
  return sampler(prompts, **kwargs)
