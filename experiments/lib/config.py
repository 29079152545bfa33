"""``TrainConfig``: one run of the experiments' training loop (optimizer, steps, data, outputs, checkpoints)."""

from __future__ import annotations

import dataclasses

import mos_jax
from experiments.lib.optim import SCHEDULES


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """One run. ``mos=None`` trains the head alone (the frozen-base floor) or, in ``train_lm``, everything."""

  mos: mos_jax.MoSConfig | None
  lr: float = 1e-3
  weight_decay: float = 0.0
  warmup_frac: float = 0.06
  schedule: str = "linear"  # or "cosine"
  clip_norm: float = 1.0
  steps: int = 300
  batch_size: int = 32
  eval_every: int = 100
  eval_batch_size: int = 128
  length_buckets: tuple[int, ...] = (16, 32, 64)
  num_classes: int = 2
  compute_dtype: str = "float32"  # or "bfloat16": the base's activations; pools stay float32
  seed: int = 0
  out_dir: str = "runs/demo"
  progress: bool = True
  checkpoint_every: int = 0  # > 0: Orbax checkpoints in out_dir/checkpoints every N steps, on SIGTERM, at the end
  keep_checkpoints: int = 3  # most recent checkpoints kept
  resume: bool = False  # continue from the newest readable checkpoint (a fresh start if there is none)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
    if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
      raise ValueError("steps, batch_size and eval_every must be positive")
    if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
      raise ValueError(f"checkpoint_every must be >= 0 and keep_checkpoints >= 1, got "
                       f"{self.checkpoint_every} and {self.keep_checkpoints}")
    if self.resume and not self.checkpoint_every:
      raise ValueError("resume=True needs checkpoint_every > 0 (resuming a run that saves no checkpoints).")


#: TrainConfig fields that do not change the trained values, so a resumed run may change them.
RESUMABLE_CHANGES = ("out_dir", "progress", "eval_every", "eval_batch_size", "checkpoint_every",
                     "keep_checkpoints", "resume")
