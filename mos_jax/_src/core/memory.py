"""Memory and storage estimates of MoS versus LoRA, from parameter shapes alone."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.adapter import count_params, trainable_count
from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.routing import ROUTING_VERSION, AdapterSpec, make_spec
from mos_jax._src.core.targets import Group, KernelLayout, find_groups

GIB = 1 << 30
#: Routing index arrays are int32 (see :func:`mos_jax.core.make_spec`).
INDEX_BYTES = np.dtype(np.int32).itemsize
# 4-bit names numpy cannot size (nf4 is QLoRA's); counted as 4 bits, constants excluded.
_FOUR_BIT = frozenset({"int4", "uint4", "nf4", "fp4", "float4_e2m1fn"})
def dtype_bits(dtype: Any) -> int:
  """Bits per element of a dtype name or dtype; 4 for ``"nf4"``/``"int4"``.

  Example:
    >>> dtype_bits("bfloat16"), dtype_bits("nf4")
    (16, 4)
  """
  if str(dtype) in _FOUR_BIT:
    return 4
  try:
    return jnp.dtype(dtype).itemsize * 8
  except TypeError as e:
    raise ValueError(f"Unknown dtype {dtype!r}: use a numpy/JAX dtype name such as 'float32', "
                     "'bfloat16', 'int8', or 'nf4'/'int4' for 4-bit.") from e


def _nbytes(count: int, dtype: Any) -> int:
  return math.ceil(count * dtype_bits(dtype) / 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterCost:
  """What one adapter variant costs to train, store and serve.

  Attributes:
    label: e.g. ``"MoS r=8 r_e=1 l=2"`` or ``"LoRA r=8"``.
    rank: active rank of every adapted layer.
    equivalent_rank: LoRA rank with the same trainable count.
    trainable_params: trainable parameters.
    optimizer_state_bytes: optimizer moments of the trainable parameters.
    weight_bytes: trainable parameters in the adapter dtype.
    routing_entries: int32 index entries of MoS's routing (0 for LoRA).
    routing_bytes: ``routing_entries`` as int32.
    file_bytes: ``weight_bytes`` plus ``routing_bytes`` if routing is counted.
    adapters_per_budget: adapters of ``file_bytes`` that fit in the serving budget.
  """

  label: str
  rank: int
  equivalent_rank: int
  trainable_params: int
  optimizer_state_bytes: int
  weight_bytes: int
  routing_entries: int
  routing_bytes: int
  file_bytes: int
  adapters_per_budget: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
  """MoS against LoRA at the same active rank and at the same budget.

  Attributes:
    mos: the MoS adapter.
    lora: LoRA at ``lora_rank`` (by default MoS's active rank ``r``).
    lora_equivalent: LoRA at ``r_e``, MoS's parameter budget.
    base_params: frozen base parameters (every leaf of the params tree).
    base_bytes: ``base_params`` in ``base_dtype``.
    num_module_types: adapted module types (pairs of pools).
    num_modules: adapted modules (``Σ L``).
    optimizer_moments: moments per trainable parameter (AdamW: 2).
    state_dtype: dtype of the optimizer moments.
    adapter_dtype: dtype of stored and served adapter weights.
    base_dtype: dtype of the frozen base.
    routing_counted: whether MoS's index arrays are in ``file_bytes``.
    serving_budget_bytes: memory next to the base for adapters.
    seed: MoS seed that regenerates the routing.

  Example:
    >>> est = estimate_memory(shapes, MoSConfig(rank=8, equivalent_rank=1))  # doctest: +SKIP
    >>> est.ratios()["lora"]["trainable"]  # doctest: +SKIP
    8.0
  """

  mos: AdapterCost
  lora: AdapterCost
  lora_equivalent: AdapterCost
  base_params: int
  base_bytes: int
  num_module_types: int
  num_modules: int
  optimizer_moments: int
  state_dtype: str
  adapter_dtype: str
  base_dtype: str
  routing_counted: bool
  serving_budget_bytes: int
  seed: int

  @property
  def variants(self) -> tuple[AdapterCost, AdapterCost, AdapterCost]:
    """``(mos, lora, lora_equivalent)``, the table's columns."""
    return self.mos, self.lora, self.lora_equivalent

  def ratios(self) -> dict[str, dict[str, float]]:
    """MoS's advantage over each LoRA: cost ratios ``LoRA / MoS``, capacity ``MoS / LoRA``.

    Returns:
      ``{"lora": {...}, "lora_equivalent": {...}}``, each with ``trainable``,
      ``optimizer_state``, ``file`` (> 1: MoS is smaller) and
      ``adapters_per_budget`` (> 1: more MoS adapters fit).
    """
    def against(other: AdapterCost) -> dict[str, float]:
      return {
          "trainable": _ratio(other.trainable_params, self.mos.trainable_params),
          "optimizer_state": _ratio(other.optimizer_state_bytes, self.mos.optimizer_state_bytes),
          "file": _ratio(other.file_bytes, self.mos.file_bytes),
          "adapters_per_budget": _ratio(self.mos.adapters_per_budget, other.adapters_per_budget),
      }
    return {"lora": against(self.lora), "lora_equivalent": against(self.lora_equivalent)}

  def to_dict(self) -> dict[str, Any]:
    """Plain-JSON view: every field plus :meth:`ratios`."""
    return {**dataclasses.asdict(self), "ratios": self.ratios()}

  def format(self) -> str:
    """A readable table: MoS vs LoRA(r) vs LoRA(r_e), with MoS's advantage.

    Example:
      >>> print(estimate_memory(shapes, MoSConfig(rank=8, equivalent_rank=1)))  # doctest: +SKIP
    """
    budget = f"{self.serving_budget_bytes / GIB:g} GiB"
    columns = [v.label for v in self.variants] + [f"vs {self.lora.label}",
                                                  f"vs {self.lora_equivalent.label}"]
    rows: list[tuple[str, list[str], tuple[str, str] | None]] = [
        ("active rank per layer", [str(v.rank) for v in self.variants], None),
        ("trainable params", [f"{v.trainable_params:,}" for v in self.variants], ("trainable", "less")),
        ("trainable % of base",
         [f"{100 * v.trainable_params / self.base_params:.4f}%" for v in self.variants], None),
        (f"optimizer state ({self.optimizer_moments}x {self.state_dtype})",
         [_human(v.optimizer_state_bytes) for v in self.variants], ("optimizer_state", "less")),
        (f"adapter weights ({self.adapter_dtype})", [_human(v.weight_bytes) for v in self.variants],
         None),
        ("routing indices (int32)",
         [f"{v.routing_entries:,} = {_human(v.routing_bytes)}" if v.routing_entries else "-"
          for v in self.variants], None),
        (f"adapter file{'' if self.routing_counted else ' (routing not counted)'}",
         [_human(v.file_bytes) for v in self.variants], ("file", "less")),
        (f"adapters in {budget}", [f"{v.adapters_per_budget:,}" for v in self.variants],
         ("adapters_per_budget", "more")),
    ]
    ratios = self.ratios()

    def advantage(spec: tuple[str, str] | None) -> list[str]:
      if spec is None:
        return ["", ""]
      key, word = spec
      return [_advantage(ratios[other][key], word) for other in ("lora", "lora_equivalent")]

    cells = [[label, *values, *advantage(spec)] for label, values, spec in rows]
    header = ["", *columns]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)).rstrip()
    routing_note = (
        f"MoS's file counts its routing indices (2·Σ L·r·l int32), which a checkpoint carrying "
        f"its routing stores; they can instead be regenerated bit-for-bit from seed={self.seed} "
        f"({ROUTING_VERSION})."
        if self.routing_counted else
        f"MoS's file and serving sizes exclude its routing indices (regenerated from "
        f"seed={self.seed}, {ROUTING_VERSION}).")
    return "\n".join([
        f"frozen base: {self.base_params:,} params = {_human(self.base_bytes)} as {self.base_dtype}; "
        f"{self.num_modules} adapted modules in {self.num_module_types} types",
        line(header),
        *(line(c) for c in cells),
        f"- {routing_note}",
        "- Not counted: gradients (one more weights-sized buffer while training), the optimizer "
        "step counter, activations.",
        "- MoS assembles LoRA(r)-sized factors transiently at each step; they are not stored.",
    ])

  def __str__(self) -> str:
    return self.format()


def _ratio(num: float, den: float) -> float:
  return float(num) / den if den else math.inf


def _advantage(ratio: float, word: str) -> str:
  # Below 1 MoS is the costlier one: say so rather than print "0.99x less".
  if ratio == 1:
    return "same"
  opposite = {"less": "more", "more": "less"}[word]
  value, word = (ratio, word) if ratio > 1 else (1 / ratio, opposite)
  return f"{value:.3f}x {word}" if value < 1.01 else f"{value:.2f}x {word}"


def _human(n: int) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def _routing_entries(spec: AdapterSpec) -> int:
  # Both arrays, even when B reuses A's indices: a native file stores both.
  return sum(int(spec.index_a[g.name].size + spec.index_b[g.name].size)
             for g in spec.groups)


def _cost(label: str, config: MoSConfig, groups: tuple[Group, ...], routing_entries: int, *,
          optimizer_moments: int, state_dtype: str, adapter_dtype: str, count_routing: bool,
          budget_bytes: int) -> AdapterCost:
  # The trainable count comes from the pools' shapes, as for a real adapter; the
  # index arrays are irrelevant to it, so none are drawn here.
  trainable = trainable_count(config, groups)
  weight_bytes = _nbytes(trainable, adapter_dtype)
  routing_bytes = routing_entries * INDEX_BYTES
  file_bytes = weight_bytes + (routing_bytes if count_routing else 0)
  return AdapterCost(
      label=label, rank=config.rank, equivalent_rank=config.equivalent_rank,
      trainable_params=trainable,
      optimizer_state_bytes=optimizer_moments * _nbytes(trainable, state_dtype),
      weight_bytes=weight_bytes, routing_entries=routing_entries, routing_bytes=routing_bytes,
      file_bytes=file_bytes, adapters_per_budget=budget_bytes // file_bytes if file_bytes else 0)


def _mos_label(config: MoSConfig) -> str:
  r_p = config.effective_private_rank
  return (f"MoS r={config.rank} r_e={config.equivalent_rank}"
          f"{f' r_p={r_p}' if r_p else ''} l={config.effective_shards_per_vector}")


def estimate_memory(params_or_shapes: Any, config: MoSConfig, *, lora_rank: int | None = None,
                    optimizer_moments: int = 2, state_dtype: str = "float32",
                    adapter_dtype: str = "float32", base_dtype: str = "bfloat16",
                    count_routing: bool = True, serving_budget_gib: float = 1.0,
                    layouts: Mapping[str, KernelLayout] | None = None) -> MemoryEstimate:
  """Training, storage and serving memory of MoS versus LoRA, allocating nothing.

  Compares the MoS adapter of ``config`` with LoRA at rank ``lora_rank`` and
  with LoRA at MoS's equivalent rank ``r_e`` (same trainable count), all on
  the modules ``config`` targets.

  Args:
    params_or_shapes: the base params, or their shapes (e.g. from
      :func:`mos_jax.hf.param_shapes`); only ``.shape`` of each leaf is read.
    config: the MoS config.
    lora_rank: rank of the LoRA baseline; default MoS's active rank ``r``.
    optimizer_moments: moments kept per trainable parameter (AdamW: 2, SGD with
      momentum: 1); the step counter is negligible and not counted.
    state_dtype: dtype of the moments (paged AdamW 32-bit: ``"float32"``).
    adapter_dtype: dtype of the adapter weights as stored and served.
    base_dtype: dtype of every base leaf (``"nf4"``/``"int4"`` count 4 bits and
      omit quantisation constants, a lower bound).
    count_routing: include MoS's int32 routing indices (``2·Σ_types L·r·l``
      entries) in the file and serving size, as a native checkpoint stores
      them; ``False`` when they are regenerated from the seed.
    serving_budget_gib: memory next to the base, in GiB, for "adapters that fit".
    layouts: kernel layouts from the model's backend, as for :func:`mos_jax.adapt`.

  Returns:
    A :class:`MemoryEstimate`; ``print`` it for a table.

  Raises:
    ValueError: the config cannot be applied to these params, with the same
      message :func:`mos_jax.adapt` gives; or an option is out of range.

  Example:
    >>> shapes = param_shapes(FlaxLlamaForCausalLM, LlamaConfig())  # doctest: +SKIP
    >>> config = MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2)
    >>> est = estimate_memory(shapes, config)  # doctest: +SKIP
    >>> est.lora.trainable_params // est.mos.trainable_params  # doctest: +SKIP
    8
  """
  lora_rank = config.rank if lora_rank is None else lora_rank
  if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
    raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
  if not isinstance(optimizer_moments, int) or optimizer_moments < 0:
    raise ValueError(f"optimizer_moments must be an integer >= 0, got {optimizer_moments!r}")
  if not serving_budget_gib > 0:
    raise ValueError(f"serving_budget_gib must be > 0, got {serving_budget_gib!r}")
  groups = find_groups(params_or_shapes, config, layouts=layouts)
  # Drawing the routing checks the config exactly as adapt does and counts the
  # indices a file stores; for a 7B model it is a few hundred small draws.
  mos_spec = make_spec(config, groups)
  budget_bytes = int(serving_budget_gib * GIB)
  common = dict(optimizer_moments=optimizer_moments, state_dtype=state_dtype,
                adapter_dtype=adapter_dtype, count_routing=count_routing, budget_bytes=budget_bytes)
  lora_cfg = lambda r: MoSConfig.lora(r, target_modules=config.target_modules,
                                      exclude_modules=config.exclude_modules)
  base_params = count_params(params_or_shapes)
  return MemoryEstimate(
      mos=_cost(_mos_label(config), config, groups, _routing_entries(mos_spec), **common),
      # Plain LoRA files carry no routing, hence 0 entries.
      lora=_cost(f"LoRA r={lora_rank}", lora_cfg(lora_rank), groups, 0, **common),
      lora_equivalent=_cost(f"LoRA r={config.equivalent_rank}", lora_cfg(config.equivalent_rank),
                            groups, 0, **common),
      base_params=base_params, base_bytes=_nbytes(base_params, base_dtype),
      num_module_types=len(groups), num_modules=sum(g.num_layers for g in groups),
      optimizer_moments=optimizer_moments, state_dtype=str(state_dtype),
      adapter_dtype=str(adapter_dtype), base_dtype=str(base_dtype), routing_counted=count_routing,
      serving_budget_bytes=budget_bytes, seed=config.seed)
