"""The training loop shared by the experiments: ``mos_jax.train.make_step`` plus what a run needs around it.

AdamW with warmup and decay (:mod:`experiments.lib.optim`), a dropout key per
step, periodic evaluation, a tqdm bar, metrics as JSONL and a PNG of the
curves. Deterministic given ``TrainConfig.seed``. Optional Orbax checkpoints
(every N steps, on SIGTERM and at the end) from which a run resumes bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import mos_jax
from mos_jax import parallel
from mos_jax.core import path_str
from mos_jax.train import adapter_identity, tree_layout
from experiments.lib.config import RESUMABLE_CHANGES, TrainConfig
from experiments.lib.optim import learning_rate, make_optimizer
from experiments.lib.plots import plot_curves


class Interrupted(SystemExit):
  """Raised by :func:`fit` after SIGTERM, once the last finished step is checkpointed.

  A ``SystemExit`` (status 143, as a process killed by SIGTERM), so an uncaught
  one ends the program cleanly; rerun with ``resume=True`` to continue.
  """

  def __init__(self, step: int):
    super().__init__(128 + signal.SIGTERM)
    self.step = step


def adapters_identity(trainable: Any) -> dict[str, Any] | None:
  """:func:`mos_jax.train.adapter_identity` of the adapter in ``trainable`` (by tree path if several); ``None`` without."""
  found = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      trainable, is_leaf=lambda x: isinstance(x, mos_jax.Adapter))[0] if isinstance(x, mos_jax.Adapter)}
  if len(found) == 1:
    return adapter_identity(next(iter(found.values())))
  return {path: adapter_identity(a) for path, a in found.items()} or None


def _checkpointer(cfg: TrainConfig, out_dir: Path, trainable: Any, params: Any) -> mos_jax.TrainCheckpointer:
  identity = {"train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES},
              "adapter": adapters_identity(trainable),
              "base_model": tree_layout(params)}
  return mos_jax.TrainCheckpointer(out_dir / "checkpoints", identity=identity, save_every=cfg.checkpoint_every,
                                   keep=cfg.keep_checkpoints)


def _seek(next_batch: Callable, data_state: dict, step: int) -> None:
  """Puts the data iterator where it was after ``step`` batches."""
  if data_state["iterator"] is not None and hasattr(next_batch, "set_state"):
    next_batch.set_state(data_state["iterator"])
  else:
    # A plain deterministic callable has no state to restore: replay its batches.
    for i in range(1, step + 1):
      next_batch(i)


def _metrics_until(path: Path, step: int) -> list[dict]:
  """The logged rows of steps <= ``step`` (later ones were lost with the interrupted run)."""
  if not path.exists():
    return []
  return [row for row in map(json.loads, path.read_text().splitlines()) if row["step"] <= step]


def fit(loss_fn: Callable[..., jax.Array], trainable: Any, params: Any,
        next_batch: Callable[[int], tuple[Any, int]], cfg: TrainConfig, *,
        evaluate: Callable[[Any], dict[str, float]], name: str = "run") -> dict[str, Any]:
  """Trains ``trainable`` for ``cfg.steps`` steps of ``mos_jax.train.make_step``.

  With ``cfg.checkpoint_every > 0`` it saves (asynchronously, keeping the last
  ``cfg.keep_checkpoints``) the trainable pytree, optimizer state, dropout key,
  step and data position to ``out_dir/checkpoints`` every that many steps, at
  the end, and after the current step on SIGTERM (then raises :class:`Interrupted`).
  With ``cfg.resume`` it continues from the newest readable checkpoint, giving
  the same values and losses as an uninterrupted run; a checkpoint of another
  model, adapter or training config is refused with the differences listed.

  Args:
    loss_fn: ``loss_fn(trainable, params, batch, dropout_rng) -> scalar``; only
      ``trainable`` is differentiated, ``params`` (the frozen base) is a constant input.
    trainable: initial trainable pytree: an :class:`mos_jax.Adapter`, a dict
      holding one and a head, or full params. Checkpoints carry (and check) the
      identity of every adapter in it. The caller's arrays are not consumed.
    params: the frozen base params; never updated.
    next_batch: ``next_batch(step) -> (batch, examples in it)``, deterministic. If
      it has ``get_state() -> JSON`` and ``set_state(state)``, checkpoints store
      that state; otherwise a resumed run replays its first batches.
    cfg: optimizer, schedule, steps, evaluation period, seed, output folder, checkpoints.
    evaluate: ``evaluate(trainable) -> {"eval_...": value}``, run every
      ``cfg.eval_every`` steps and after the last.
    name: label of the progress bar and the plot.

  Returns:
    ``{"trainable", "metrics", "step_seconds", "metrics_path", "plot_path"}``; the
    step time is the median after the first steps (which include compilation).

  Raises:
    Interrupted: SIGTERM arrived; the last finished step is checkpointed.
    FileExistsError: checkpoints exist but ``cfg.resume`` is off.
  """
  out_dir = Path(cfg.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  optimizer = make_optimizer(cfg)
  step = mos_jax.train.make_step(loss_fn, optimizer)
  trainable = jax.tree_util.tree_map(jnp.array, trainable)  # a copy: the step donates what it is given
  opt_state = optimizer.init(trainable)
  dropout_key = jax.random.key(cfg.seed + 1)
  lr_at = learning_rate(cfg)
  metrics: list[dict] = []
  step_times = []
  metrics_path = out_dir / "metrics.jsonl"
  with contextlib.ExitStack() as cleanup:
    first, ckpt = 1, None
    if cfg.checkpoint_every:
      # Leaving the block closes the checkpointer, which waits for pending saves to commit.
      ckpt = cleanup.enter_context(_checkpointer(cfg, out_dir, trainable, params))
      if ckpt.all_steps():
        if not cfg.resume:
          raise FileExistsError(f"{ckpt.directory} holds checkpoints of steps {ckpt.all_steps()}: pass "
                                "resume=True to continue that run, or use a fresh out_dir.")
        restored = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "dropout_key": dropout_key})
        trainable, opt_state, dropout_key = (restored.state[k] for k in ("trainable", "opt_state", "dropout_key"))
        first = restored.step + 1
        _seek(next_batch, restored.data_state, restored.step)
        metrics = _metrics_until(metrics_path, restored.step)
    sigterm = cleanup.enter_context(parallel.sigterm_flag(enabled=ckpt is not None))
    log = cleanup.enter_context(open(metrics_path, "w"))
    log.writelines(json.dumps(row) + "\n" for row in metrics)
    bar = tqdm(range(first, cfg.steps + 1), initial=first - 1, total=cfg.steps, desc=name,
               disable=not cfg.progress, dynamic_ncols=True)
    for i in bar:
      batch, n = next_batch(i)
      start = time.perf_counter()
      trainable, opt_state, loss = step(trainable, opt_state, params, batch, jax.random.fold_in(dropout_key, i))
      loss = float(loss)
      step_times.append(time.perf_counter() - start)
      if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: loss became {loss} at step {i}; lower lr or use float32.")
      row = {"step": i, "loss": loss, "lr": float(lr_at(i - 1)), "examples_per_s": n / step_times[-1]}
      if i % cfg.eval_every == 0 or i == cfg.steps:
        row.update(evaluate(trainable))
      metrics.append(row)
      log.write(json.dumps(row) + "\n")
      log.flush()  # rows up to a checkpoint must survive a kill, for the resumed run to keep them
      bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k == "loss" or k.startswith("eval_")}
                      | {"ex/s": f"{row['examples_per_s']:.0f}"})
      stop = sigterm.is_set()
      if ckpt is not None and (stop or i == cfg.steps or ckpt.should_save(i)):
        iterator = next_batch.get_state() if hasattr(next_batch, "get_state") else None
        ckpt.save(i, {"trainable": trainable, "opt_state": opt_state, "dropout_key": dropout_key},
                  data_state={"position": i, "iterator": iterator}, force=True)
      if stop:
        raise Interrupted(i)
  plot_curves(metrics, out_dir / "curves.png", name)
  steady = step_times[len(cfg.length_buckets) + 2:] or step_times
  # A run resumed from its last step trains no further step, so it has no step time.
  step_seconds = float(np.median(steady)) if steady else float("nan")
  return {"trainable": trainable, "metrics": metrics, "step_seconds": step_seconds,
          "metrics_path": metrics_path, "plot_path": out_dir / "curves.png"}
