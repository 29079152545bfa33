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


#: config.json of the models the pod configs train (the hub's values; a multimodal Gemma 3's text_config).
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262208, head_dim=256, query_pre_attn_scalar=256,
               sliding_window=1024, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
               rope_scaling={"factor": 8.0, "rope_type": "linear"}, rms_norm_eps=1e-6)
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "google/gemma-3-4b-it": {**_GEMMA3, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                             "num_attention_heads": 8, "num_key_value_heads": 4},
    "google/gemma-3-12b-it": {**_GEMMA3, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
                              "num_attention_heads": 16, "num_key_value_heads": 8},
    "google/gemma-3-27b-it": {**_GEMMA3, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
                              "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                              "query_pre_attn_scalar": 168},
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def chips_of(accelerator: str) -> int:
  """Chips of a Cloud TPU type: v4-32 and v5p-N count TensorCores (2 per chip), v5litepod-N and v6e-N chips."""
  kind, _, count = accelerator.rpartition("-")
  if not count.isdigit():
    raise ValueError(f"Accelerator type {accelerator!r} has no core/chip count (like v4-32 or v5litepod-16).")
  return int(count) // 2 if kind in ("v4", "v5p") else int(count)


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
    parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in dataclasses.asdict(self).items())
    limit = f" of {hbm_gib:g} GiB" if hbm_gib else ""
    return f"memory per chip (estimate): {parts}; total {_size(self.total)}{limit}"


def _size(n: int) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


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
  lines = [f"This run needs about {_size(memory.total)} per chip; {usable_fraction:.0%} of {hbm_gib:g} GiB is "
           f"{_size(int(limit))}. {memory.format(hbm_gib)}.", "Fixes (estimated total per chip):"]
  for what, fixed in fixes.items():
    verdict = "fits" if fixed.total <= limit else "still too much"
    lines.append(f"  - {what}: {_size(fixed.total)} ({verdict})")
  return "\n".join(lines)


def plan(cfg: Any, hf: Mapping[str, Any], mesh: Any) -> tuple[ChipMemory, dict[str, ChipMemory]]:
  """The memory per chip of a run (:class:`experiments.lib.run_config.RunConfig`) of the model ``hf`` on ``mesh``,
  and of each fix (another mesh, remat, a smaller batch or sequence), allocating no weights.

  The base's shards come from the model's real shardings on ``mesh``; the MoS
  state and factors from the adapter ``mos_jax.nnx.adapt`` makes of the
  shape-only model.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import mos_jax  # noqa: PLC0415
  from experiments.lib import nnx_models  # noqa: PLC0415
  from mos_jax import parallel  # noqa: PLC0415

  family = nnx_models.family_of(hf)
  tunix_cfg = nnx_models.tunix_config(hf, family, dtype=jnp.dtype(cfg.dtype), remat=cfg.remat)
  mos = dataclasses.replace(cfg.mos, target_modules=cfg.targets or nnx_models.family_targets(family, tunix_cfg))
  abstract = nnx_models.abstract_model(family, tunix_cfg)
  _, state = nnx.split(abstract)
  shapes = {nnx_models.path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}
  adapter = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(abstract, dataclasses.replace(mos, dropout=0.0)))
  trainable = sum(int(v.size) for e in adapter.pools.values() for v in e.values())
  factors = sum(mos.rank * (g.d_in + g.d_out) * g.num_layers for g in adapter.groups)
  shape = Shape(layers=tunix_cfg.num_layers, embed=tunix_cfg.embed_dim, hidden=tunix_cfg.hidden_dim,
                heads=tunix_cfg.num_heads, head_dim=tunix_cfg.head_dim,
                vocab=getattr(tunix_cfg, "num_embed", getattr(tunix_cfg, "vocab_size", 0)))

  def at(mesh_: Any, global_batch: int, seq_len: int, remat: str) -> ChipMemory:
    base = base_bytes(shapes, nnx_models.param_shardings(abstract, mesh_), jnp.dtype(cfg.dtype))
    rows = max(1, global_batch // (mesh_.shape["data"] * mesh_.shape["fsdp"]))
    return estimate(shape, base=base, trainable=trainable, factor_values=factors, rows=rows, seq_len=seq_len,
                    tensor=mesh_.shape["tensor"], remat=remat, loss_chunk=cfg.loss_chunk)

  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  fixes = {}
  if mesh.shape["fsdp"] < mesh.size:
    every = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=-1, tensor=1), devices=list(mesh.devices.flat))
    fixes[f"--mesh fsdp={mesh.size} (the base sharded over every chip)"] = at(every, cfg.global_batch, cfg.seq_len,
                                                                              cfg.remat)
  if cfg.remat != "decoder":
    fixes["remat='decoder' (each layer recomputed in the backward pass)"] = at(mesh, cfg.global_batch, cfg.seq_len,
                                                                               "decoder")
  if cfg.global_batch > data_parallel:
    smaller = max(data_parallel, cfg.global_batch // 2)
    fixes[f"global_batch={smaller}"] = at(mesh, smaller, cfg.seq_len, cfg.remat)
  if cfg.seq_len % 2 == 0 and (cfg.seq_len // 2) % min(cfg.loss_chunk, cfg.seq_len // 2) == 0:
    fixes[f"seq_len={cfg.seq_len // 2}"] = at(mesh, cfg.global_batch, cfg.seq_len // 2, cfg.remat)
  return at(mesh, cfg.global_batch, cfg.seq_len, cfg.remat), fixes
