"""The :class:`Adapter` value (trainable pools + static :class:`AdapterSpec`, a pytree) and ``adapt``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.pools import Pools, check_pools, init_pools, pool_shapes
from mos_jax._src.core.routing import AdapterSpec, check_group, make_spec
from mos_jax._src.core.targets import Group, KernelLayout, find_groups


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A MoS adapter: trainable pools plus its static spec, as one pytree.

  Its leaves are exactly the pools, so ``optimizer.init(adapter)``,
  ``jax.grad`` with respect to an adapter, ``jax.device_put`` and Orbax all
  see only the trainable parameters; the spec (config, groups, index
  arrays, routing version) and the base model's parameter count are static.

  Attributes:
    pools: ``{group: {"A": P_A, "B": P_B}}``.
    spec: the static :class:`mos_jax.core.AdapterSpec`: config, groups, index arrays and routing version.
    base_params: number of parameters of the base model it was made for (0 if unknown).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(2)}}
    >>> adapter = adapt(params, MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
    >>> [x.shape for x in jax.tree_util.tree_leaves(adapter)]
    [(2, 8), (2, 4)]
  """

  pools: Pools
  spec: AdapterSpec
  base_params: int = 0

  @property
  def config(self) -> MoSConfig:
    return self.spec.config

  @property
  def groups(self) -> tuple[Group, ...]:
    return self.spec.groups

  def replace(self, **changes: Any) -> "Adapter":
    """A copy with fields replaced, e.g. ``adapter.replace(pools=trained)``; the pools are checked."""
    new = dataclasses.replace(self, **changes)
    check_pools(new.pools, new.spec)
    return new


jax.tree_util.register_dataclass(Adapter, data_fields=["pools"], meta_fields=["spec", "base_params"])


def require_adapter(value: Any, where: str) -> Adapter:
  """Returns ``value`` if it is an :class:`Adapter`, else raises a ``TypeError`` saying what to pass."""
  if not isinstance(value, Adapter):
    raise TypeError(f"{where} takes an mos_jax.Adapter (pools and spec in one value, from mos_jax.adapt "
                    f"or mos_jax.load_adapter), got {type(value).__name__}. Pools, factors or a spec "
                    "alone cannot be checked against each other.")
  return value


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or shape structs."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def adapt(params: Any, config: MoSConfig, *, layouts: Mapping[str, KernelLayout] | None = None) -> Adapter:
  """Creates a MoS adapter for a Flax params pytree.

  Args:
    params: the frozen base params (HF Flax model ``.params``, linen
      ``variables["params"]``, an NNX pure dict, or ``jax.ShapeDtypeStruct``s).
    config: the adapter config.
    layouts: how each kernel acts as a linear map, recorded from the model by
      its backend (:func:`mos_jax.linen.kernel_layouts`); needed to adapt
      kernels that are not 2-D ``(d_in, d_out)`` and to check module types.

  Returns:
    An :class:`Adapter`: train it (its leaves are the pools), keep its spec static.

  Raises:
    ValueError: no module matched, a matched kernel cannot be adapted, a module
      type's shapes disagree, a dimension is not divisible by ``l``, or the
      public region is too small for the draw.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(4)}}
    >>> adapter = adapt(params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, target_modules=["q_proj"]))
    >>> adapter.pools["layers/*/q_proj"]["A"].shape
    (8, 4)
  """
  spec = make_spec(config, find_groups(params, config, layouts=layouts))
  return Adapter(pools=init_pools(spec), spec=spec, base_params=count_params(params))


def _lora_count(groups: tuple[Group, ...], rank: int) -> int:
  return sum(rank * g.num_layers * (g.d_in + g.d_out) for g in groups)


def trainable_count(config: MoSConfig, groups: tuple[Group, ...]) -> int:
  """Trainable parameters: ``r_e · Σ_types L·(d_in + d_out)``.

  Example:
    >>> trainable_count(adapter.config, adapter.groups)  # doctest: +SKIP
  """
  return sum(int(np.prod(s)) for shapes in pool_shapes(config, groups).values() for s in shapes.values())


def _table(config: MoSConfig, groups: tuple[Group, ...], base_params: int | None) -> str:
  c = config
  trainable = trainable_count(config, groups)
  lora_r = _lora_count(groups, c.rank)
  lines = [
      f"MoS adapter: r={c.rank} r_e={c.equivalent_rank} r_p={c.effective_private_rank} "
      f"l={c.effective_shards_per_vector} alpha={c.alpha} dropout={c.dropout} seed={c.seed}",
      f"strategies: subset_selection={c.subset_selection} pair_dissociation={c.pair_dissociation} "
      f"vector_sharding={c.vector_sharding} shard_privatization={c.shard_privatization}",
      f"{'module type':<48} {'L':>3} {'d_in':>6} {'d_out':>6} {'P_A':>14} {'P_B':>14} {'params':>10}",
  ]
  shapes = pool_shapes(config, groups)
  for g in groups:
    a, b = shapes[g.name]["A"], shapes[g.name]["B"]
    lines.append(f"{g.name:<48} {g.num_layers:>3} {g.d_in:>6} {g.d_out:>6} "
                 f"{str(a):>14} {str(b):>14} {a[0] * a[1] + b[0] * b[1]:>10,}")
  pct = f" || all params: {base_params:,} || trainable%: {100 * trainable / base_params:.4f}" \
      if base_params else ""
  lines += [
      f"trainable params: {trainable:,}{pct}",
      f"LoRA-equivalent rank (budget): {c.equivalent_rank}; active rank per layer: {c.rank}",
      f"LoRA rank {c.rank} would train {lora_r:,} params: MoS uses {lora_r / trainable:.2f}x fewer",
  ]
  return "\n".join(lines)


def summary(adapter: Adapter) -> str:
  """Describes an adapter like PEFT's ``print_trainable_parameters``, per group.

  Returns:
    A multi-line table: per-group pool shapes and counts, trainable parameters,
    the LoRA-equivalent rank and the saving versus LoRA at the same active rank.

  Example:
    >>> print(summary(adapter))  # doctest: +SKIP
  """
  return _table(adapter.config, adapter.groups, adapter.base_params)


def dry_run(params: Any, config: MoSConfig, *, layouts: Mapping[str, KernelLayout] | None = None) -> str:
  """Lists what ``adapt(params, config)`` would match and create, allocating nothing.

  Shape problems raise the same errors ``adapt`` would.

  Example:
    >>> print(dry_run(model.params, config))  # doctest: +SKIP
  """
  groups = find_groups(params, config, layouts=layouts)
  for g in groups:
    check_group(config, g)
  matched = [f"  {p}{' (stacked)' if g.stacked else ''}" for g in groups for p in g.paths]
  return "\n".join([f"matched {len(matched)} modules:", *matched, _table(config, groups, count_params(params))])
