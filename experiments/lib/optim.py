"""The learning-rate schedule and optimizer every training script uses: warmup, decay, clip, AdamW."""

from __future__ import annotations

from typing import Protocol

import optax

SCHEDULES = ("linear", "cosine")


class OptimizerConfig(Protocol):
  """The fields read here (``TrainConfig`` has them; ``experiments.lib.run_config.RunConfig`` makes one)."""

  lr: float
  steps: int
  warmup_frac: float
  schedule: str  # "linear" or "cosine" decay after the warmup
  clip_norm: float
  weight_decay: float


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_frac`` of the steps (at least one), then linear or cosine decay to 0."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  warmup = max(1, int(cfg.warmup_frac * cfg.steps))
  decay_steps = max(1, cfg.steps - warmup)
  decay = (optax.cosine_decay_schedule(cfg.lr, decay_steps) if cfg.schedule == "cosine"
           else optax.linear_schedule(cfg.lr, 0.0, decay_steps))
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Global-norm clipping at ``clip_norm``, then AdamW on :func:`learning_rate` with ``weight_decay``."""
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(learning_rate(cfg), weight_decay=cfg.weight_decay))
