"""``adapt``: from a params pytree and a config to pools plus routing."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mos_jax._config import MoSConfig
from mos_jax._pools import Pools, init_pools, pool_shapes
from mos_jax._routing import Routing, check_group, make_routing
from mos_jax._targets import Group, find_groups


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A MoS adapter: trainable pools plus static routing.

  Attributes:
    pools: ``{group: {"A": P_A, "B": P_B}}``, the only trainable leaves.
    routing: the static :class:`Routing` (config, groups, index arrays).
    base_params: number of parameters in the base params pytree.
  """

  pools: Pools
  routing: Routing
  base_params: int


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def adapt(params: Any, config: MoSConfig) -> Adapter:
  """Creates a MoS adapter for a Flax params pytree.

  Args:
    params: the frozen base params (HF Flax model ``.params``, linen
      ``variables["params"]``, or an NNX pure dict).
    config: the adapter config.

  Returns:
    An :class:`Adapter`; train ``adapter.pools``, keep ``adapter.routing`` static.

  Raises:
    ValueError: no module matched, a module type's shapes disagree, a dimension
      is not divisible by ``l``, or the public region is too small for the draw.

  Example:
    >>> model = FlaxLlamaForCausalLM(LlamaConfig(...))  # doctest: +SKIP
    >>> adapter = adapt(model.params, MoSConfig(rank=8, equivalent_rank=1))  # doctest: +SKIP
  """
  routing = make_routing(config, find_groups(params, config))
  return Adapter(pools=init_pools(routing), routing=routing, base_params=_count(params))


def _lora_count(groups: tuple[Group, ...], rank: int) -> int:
  return sum(rank * g.num_layers * (g.d_in + g.d_out) for g in groups)


def trainable_count(routing: Routing) -> int:
  """Trainable parameters: ``r_e · Σ_types L·(d_in + d_out)``."""
  return sum(int(np.prod(s)) for shapes in pool_shapes(routing).values() for s in shapes.values())


def _table(routing: Routing, base_params: int | None) -> str:
  c = routing.config
  trainable = trainable_count(routing)
  lora_r = _lora_count(routing.groups, c.rank)
  lines = [
      f"MoS adapter: r={c.rank} r_e={c.equivalent_rank} r_p={c.effective_private_rank} "
      f"l={c.effective_shards_per_vector} alpha={c.alpha} dropout={c.dropout} seed={c.seed}",
      f"strategies: subset_selection={c.subset_selection} pair_dissociation={c.pair_dissociation} "
      f"vector_sharding={c.vector_sharding} shard_privatization={c.shard_privatization}",
      f"{'module type':<48} {'L':>3} {'d_in':>6} {'d_out':>6} {'P_A':>14} {'P_B':>14} {'params':>10}",
  ]
  shapes = pool_shapes(routing)
  for g in routing.groups:
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
  return _table(adapter.routing, adapter.base_params)


def dry_run(params: Any, config: MoSConfig) -> str:
  """Lists what ``adapt(params, config)`` would match and create, allocating nothing.

  Shape problems raise the same errors ``adapt`` would.

  Example:
    >>> print(dry_run(model.params, config))  # doctest: +SKIP
  """
  groups = find_groups(params, config)
  for g in groups:
    check_group(config, g)
  routing = Routing(config=config, groups=groups, index_a={}, index_b={})
  matched = [f"  {p}{' (stacked)' if g.stacked else ''}" for g in groups for p in g.paths]
  return "\n".join([f"matched {len(matched)} modules:", *matched,
                    _table(routing, _count(params))])
