"""Memory per chip of a MoS training run, estimated before any weight is loaded, and a refusal with the fix.

The frozen base is counted exactly: every parameter's shard shape under its
sharding, in the load dtype. The MoS state (pools, their gradients and AdamW's
two moments, float32, replicated) and the factors assembled at each step are
counted from the adapter's real shapes. Activations are an estimate: per layer
and token, the bf16 tensors a transformer block keeps for its backward pass
(about ``8·D + 4·F/t + 4·N·H/t`` values, ``t`` the tensor-parallel size) plus
the attention scores and probabilities (``N/t · T`` values at 6 bytes); with
``remat="decoder"`` only each layer's input (``D`` values) is kept, plus one
layer's full set while it is recomputed. The loss's logits are one chunk of
``loss_chunk`` positions in float32 (value and gradient). XLA's scratch space
and fragmentation are covered by a margin: a run is refused above
``usable_fraction`` of the chip's memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

GIB = 1 << 30
#: HBM per chip (GiB), by the accelerator-type prefix of Cloud TPU (v5e is v5litepod).
HBM_GIB = {"v4": 32.0, "v5litepod": 16.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}


def hbm_of(accelerator: str) -> float:
  """HBM per chip in GiB of an accelerator type (``v4-32``, ``v5litepod-16``, ...).

  Raises:
    ValueError: an unknown type (the known ones are listed).
  """
  for prefix in sorted(HBM_GIB, key=len, reverse=True):
    if accelerator.startswith(prefix):
      return HBM_GIB[prefix]
  raise ValueError(f"Unknown accelerator {accelerator!r}: known prefixes {sorted(HBM_GIB)}; pass hbm_gib instead.")


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the activation estimate needs of a model and a run."""

  layers: int
  embed: int
  hidden: int
  heads: int
  head_dim: int
  vocab: int


@dataclasses.dataclass(frozen=True)
class ChipMemory:
  """Bytes per chip, by part. ``total`` is their sum."""

  base: int
  mos_state: int
  factors: int
  activations: int
  logits: int

  @property
  def total(self) -> int:
    return self.base + self.mos_state + self.factors + self.activations + self.logits

  def format(self, hbm_gib: float | None = None) -> str:
    parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in dataclasses.asdict(self).items())
    limit = f" of {hbm_gib:g} GiB" if hbm_gib else ""
    return f"memory per chip (GiB, estimate): {parts}; total {self.total / GIB:.2f}{limit}"


def base_bytes(shapes: Mapping[str, Any], shardings: Mapping[str, Any], dtype: Any) -> int:
  """Bytes of the largest per-device share of the frozen base (shard shapes under their shardings)."""
  item = np.dtype(dtype).itemsize
  return sum(int(np.prod(shardings[k].shard_shape(tuple(s.shape)))) * item for k, s in shapes.items())


def activation_bytes(shape: Shape, *, rows: int, seq_len: int, tensor: int, remat: str) -> int:
  """Saved activations of ``rows`` sequences of ``seq_len`` tokens on one chip (see the module docstring)."""
  tokens = rows * seq_len
  full = 2 * (8 * shape.embed + 4 * shape.hidden // tensor + 4 * shape.heads * shape.head_dim // tensor) \
      + 6 * (shape.heads // max(1, min(tensor, shape.heads))) * seq_len
  per_layer = full if remat == "none" else (2 * shape.embed if remat == "decoder" else full // 2)
  recompute = full if remat != "none" else 0
  return tokens * (shape.layers * per_layer + recompute)


def estimate(shape: Shape, *, base: int, trainable: int, factor_values: int, rows: int, seq_len: int, tensor: int,
             remat: str, loss_chunk: int) -> ChipMemory:
  """A :class:`ChipMemory`.

  Args:
    shape: the model's sizes.
    base: bytes of the base on one chip (:func:`base_bytes`).
    trainable: MoS's trainable parameters (the pools).
    factor_values: values of all assembled factors (``Σ r·(d_in + d_out)`` over adapted modules).
    rows: sequences per chip (global batch over the data-parallel size).
    seq_len: tokens per sequence.
    tensor: the tensor-parallel size.
    remat: ``none``, ``block`` or ``decoder``.
    loss_chunk: positions per chunk of the output head.
  """
  return ChipMemory(base=base, mos_state=trainable * 4 * 4, factors=factor_values * 4 * 2,
                    activations=activation_bytes(shape, rows=rows, seq_len=seq_len, tensor=tensor, remat=remat),
                    logits=rows * min(loss_chunk, seq_len) * shape.vocab * 4 * 2 // tensor)


def refusal(memory: ChipMemory, hbm_gib: float, usable_fraction: float, fixes: Mapping[str, ChipMemory]) -> str | None:
  """``None`` if ``memory`` fits, else the message: the numbers and each fix with the total it gives."""
  limit = hbm_gib * GIB * usable_fraction
  if memory.total <= limit:
    return None
  lines = [f"This run needs about {memory.total / GIB:.2f} GiB per chip; {usable_fraction:.0%} of "
           f"{hbm_gib:g} GiB is {limit / GIB:.2f} GiB. {memory.format(hbm_gib)}.", "Fixes (estimated total per chip):"]
  for what, fixed in fixes.items():
    verdict = "fits" if fixed.total <= limit else "still too much"
    lines.append(f"  - {what}: {fixed.total / GIB:.2f} GiB ({verdict})")
  return "\n".join(lines)
