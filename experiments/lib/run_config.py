"""``RunConfig``: one run of ``python -m experiments.train`` (model, data, MoS, mesh, optimizer, memory).

A config file is a Python file that defines ``CONFIG = RunConfig(...)``
(``experiments/configs/*.py``); the command line overrides the model, data,
steps and mesh. Every field has a default, so a run needs no file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.lib.config import TrainConfig
from experiments.lib.optim import SCHEDULES


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """One training run of a Tunix NNX model from HF safetensors on instruction data.

  Attributes:
    model: model folder, ``gs://...`` or ``hf://ORG/NAME`` (``--model``).
    data: JSONL/Parquet instruction rows, local or ``gs://`` (``--data``).
    eval_data: held-out rows; ``None`` holds out ``eval_fraction`` of ``data`` (at most ``eval_max``).
    mos: the adapter; its ``target_modules`` are replaced by ``targets`` or the family's projections.
    targets: module names to adapt; ``None``: every attention and MLP projection of the family.
    mesh: ``data`` x ``fsdp`` x ``tensor`` sizes (``--mesh fsdp=4,tensor=2``).
    global_batch: rows per step over all chips; divisible by data x fsdp.
    seq_len: tokens per row; a multiple of ``loss_chunk`` when longer than it.
    pack: examples per row (1: padding, one example per row).
    dtype: the base's parameter dtype (``bfloat16``; ``float32`` for CPU checks).
    remat: Tunix's rematerialisation, ``none``, ``block`` or ``decoder`` (least memory).
    loss_chunk: positions whose logits are computed at once.
    accelerator: the Cloud TPU type the config is made for (``v4-32``, ``v5litepod-16``): its chip count and
      memory per chip (``experiments.pod_memory`` tabulates the configs).
    hbm_gib: memory per chip; ``None``: the accelerator's, else what the device reports (CPU: no check).
    usable_fraction: share of ``hbm_gib`` a run may plan for (the rest is XLA's scratch).
    generate: held-out prompts decoded greedily after training (0: none).
    max_new_tokens: tokens generated per prompt.
  """

  model: str | None = None
  data: str | None = None
  eval_data: str | None = None
  eval_fraction: float = 0.05
  eval_max: int = 256
  mos: MoSConfig = MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, alpha=16.0)
  targets: tuple[str, ...] | None = None
  mesh: MeshConfig = MeshConfig(data=-1, fsdp=1, tensor=1)
  global_batch: int = 8
  seq_len: int = 512
  pack: int = 1
  steps: int = 100
  lr: float = 2e-4
  warmup_frac: float = 0.03
  schedule: str = "cosine"
  clip_norm: float = 1.0
  weight_decay: float = 0.0
  dtype: str = "bfloat16"
  remat: str = "none"
  loss_chunk: int = 512
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  eval_every: int = 100
  accelerator: str | None = None
  hbm_gib: float | None = None
  usable_fraction: float = 0.9
  generate: int = 0
  max_new_tokens: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.dtype not in ("bfloat16", "float32"):
      raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
    for name in ("global_batch", "seq_len", "pack", "steps", "loss_chunk", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.hbm_gib is None and self.accelerator:
      from experiments.lib.chip_memory import hbm_of  # noqa: PLC0415
      object.__setattr__(self, "hbm_gib", hbm_of(self.accelerator))
    if self.seq_len > self.loss_chunk and self.seq_len % self.loss_chunk:
      raise ValueError(f"seq_len={self.seq_len} is not a multiple of loss_chunk={self.loss_chunk}: make it one.")

  def train_config(self, workdir: str, *, progress: bool = True) -> TrainConfig:
    """The :class:`TrainConfig` of :func:`experiments.lib.loop.fit` (always resuming a run folder's checkpoints)."""
    return TrainConfig(mos=self.mos, lr=self.lr, weight_decay=self.weight_decay, warmup_frac=self.warmup_frac,
                       schedule=self.schedule, clip_norm=self.clip_norm, steps=self.steps,
                       batch_size=self.global_batch, eval_every=self.eval_every, compute_dtype=self.dtype,
                       seed=self.seed, out_dir=workdir, progress=progress, checkpoint_every=self.checkpoint_every,
                       keep_checkpoints=self.keep_checkpoints, resume=self.checkpoint_every > 0)

  def identity(self) -> dict[str, Any]:
    """What a checkpoint of this run must match beyond the TrainConfig (the data's shape and the base's dtype)."""
    return {k: getattr(self, k) for k in ("seq_len", "pack", "dtype", "eval_fraction", "eval_max", "targets")}


def parse_mesh(text: str) -> MeshConfig:
  """``"fsdp=4,tensor=2"`` -> ``MeshConfig(data=-1, fsdp=4, tensor=2)`` (unnamed axes: data takes the rest).

  Raises:
    ValueError: an axis other than data/fsdp/tensor, or a size that is not an integer.
  """
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in ("data", "fsdp", "tensor") or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected comma-separated data=N, fsdp=N, tensor=N (one may be -1).")
    sizes[name] = int(value)
  sizes.setdefault("data", -1 if -1 not in sizes.values() else 1)
  sizes.setdefault("fsdp", 1)
  sizes.setdefault("tensor", 1)
  return MeshConfig(**sizes)


def load_config(path: str) -> RunConfig:
  """``CONFIG`` of a config file.

  Raises:
    ValueError: the file defines no ``CONFIG = RunConfig(...)``.
  """
  spec = importlib.util.spec_from_file_location("run_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not isinstance(getattr(module, "CONFIG", None), RunConfig):
    raise ValueError(f"{path} must define CONFIG = RunConfig(...) (from experiments.lib.run_config).")
  return module.CONFIG


def pod_config(model: str, accelerator: str, **overrides: Any) -> RunConfig:
  """The settings the pod configs share, for ``model`` on a slice of type ``accelerator``.

  MoS r=8, r_e=1, l=2 (the paper's budget of LoRA rank 1), alpha 16, dropout 0.05 on the family's
  attention and MLP projections; the bf16 base FSDP-sharded over every chip; 32 rows of 2048 tokens
  per step; each decoder layer recomputed in the backward pass; AdamW 2e-4, 3% warmup, cosine decay,
  2000 steps; a checkpoint and a held-out loss every 200 steps; 8 greedy generations at the end.

  Example:
    >>> CONFIG = pod_config("hf://google/gemma-3-27b-it", "v5litepod-16", global_batch=16)  # doctest: +SKIP
  """
  from experiments.lib.chip_memory import chips_of  # noqa: PLC0415

  settings = dict(model=model, accelerator=accelerator,
                  mos=MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, alpha=16.0, dropout=0.05),
                  mesh=MeshConfig(data=1, fsdp=chips_of(accelerator), tensor=1), global_batch=32, seq_len=2048,
                  loss_chunk=512, remat="decoder", dtype="bfloat16", steps=2000, lr=2e-4, warmup_frac=0.03,
                  schedule="cosine", clip_norm=1.0, checkpoint_every=200, eval_every=200, generate=8,
                  max_new_tokens=64)
  return RunConfig(**{**settings, **overrides})
