"""The one training loop of the experiments and the pod entry point: ``mos_jax.train.make_step`` and what a run needs.

AdamW with warmup and decay (:mod:`experiments.lib.optim`), a dropout key per
step, periodic evaluation, a tqdm bar, metrics as JSONL and a PNG of the
curves. Deterministic given ``TrainConfig.seed``. Optional Orbax checkpoints
(every N steps, on a preemption notice and at the end) from which a run resumes
bit-exactly. The same loop runs on one device or on a mesh, in one process or
in many (a TPU pod slice): with ``mesh`` the step is compiled with explicit
shardings, every process runs the loop, process 0 alone writes the metrics and
draws the bar, and a SIGTERM to any process stops all of them after the same
step (:func:`mos_jax.parallel.preemption_notice`). The run folder
(``TrainConfig.out_dir``) may be a bucket (``gs://...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

import mos_jax
from mos_jax import parallel
from mos_jax.train import tree_layout
from experiments.lib.config import RESUMABLE_CHANGES, TrainConfig
from experiments.lib.optim import learning_rate, make_optimizer
from experiments.lib.plots import plot_curves
from experiments.lib.workdir import JsonlLog, is_remote, require_filesystem


class Interrupted(SystemExit):
  """Raised by :func:`fit` after a preemption notice (SIGTERM), once the last finished step is checkpointed.

  A ``SystemExit`` (status 143, as a process killed by SIGTERM), so an uncaught
  one ends the program cleanly; rerun with ``resume=True`` to continue.
  """

  def __init__(self, step: int):
    super().__init__(128 + signal.SIGTERM)
    self.step = step


def _checkpointer(cfg: TrainConfig, out_dir: epath.Path, params: Any,
                  extra: dict[str, Any] | None) -> mos_jax.TrainCheckpointer:
  # The adapters in the state need no entry: TrainCheckpointer records and checks their identity itself.
  identity = {"train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES},
              "base_model": tree_layout(params)}
  if extra:
    identity["run"] = extra
  _clear_unfinished_saves(out_dir / "checkpoints")
  return mos_jax.TrainCheckpointer(out_dir / "checkpoints", identity=identity, save_every=cfg.checkpoint_every,
                                   keep=cfg.keep_checkpoints)


def _clear_unfinished_saves(directory: epath.Path) -> None:
  """Several processes: the primary deletes unfinished step folders, then all processes wait for it.

  Orbax's manager deletes them on start-up concurrently with listing the steps
  on every process; on an object store (``gs://``) another process's listing
  then fails on a folder deleted under it. Done first, that cleanup finds nothing.
  """
  if jax.process_count() == 1:
    return
  if parallel.is_main_process() and directory.exists():
    for name in ocp.path.step.tmp_checkpoints(directory):
      (directory / name).rmtree()
  multihost_utils.sync_global_devices("experiments_clear_unfinished_saves")


def _seek(next_batch: Callable, data_state: dict, step: int) -> None:
  """Puts the data iterator where it was after ``step`` batches."""
  if data_state["iterator"] is not None and hasattr(next_batch, "set_state"):
    next_batch.set_state(data_state["iterator"])
  else:
    # A plain deterministic callable has no state to restore: replay its batches.
    for i in range(1, step + 1):
      next_batch(i)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the training state lives on a mesh: the four shardings of :func:`mos_jax.train.make_step`."""

  mesh: jax.sharding.Mesh
  trainable: Any
  params: Any
  batch: Any

  @classmethod
  def on(cls, mesh: jax.sharding.Mesh, trainable: Any, params: Any, *, trainable_sharding: Any = None,
         params_sharding: Any = None, batch_sharding: Any = None) -> "Placement":
    """Defaults: pools as :func:`mos_jax.parallel.pool_shardings` (other trainables replicated), the params'
    own shardings, batch rows over ``data`` x ``fsdp``."""
    if trainable_sharding is None:
      replicated = NamedSharding(mesh, P())
      trainable_sharding = jax.tree_util.tree_map(
          lambda x: parallel.pool_shardings(x, mesh) if isinstance(x, mos_jax.Adapter) else replicated,
          trainable, is_leaf=lambda x: isinstance(x, mos_jax.Adapter))
    if params_sharding is None:
      params_sharding = jax.tree_util.tree_map(lambda x: x.sharding, params)
    return cls(mesh, trainable_sharding, params_sharding,
               batch_sharding if batch_sharding is not None else parallel.batch_sharding(mesh))


def _place(trainable: Any, optimizer: Any, placement: Placement | None) -> tuple[Any, Any, Any, Any]:
  """``(trainable copy, opt_state, opt_state sharding, step shardings)`` on the placement (or where they are)."""
  if placement is None:
    trainable = jax.tree_util.tree_map(jnp.array, trainable)  # a copy: the step donates what it is given
    return trainable, optimizer.init(trainable), None, {}
  copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=placement.trainable)
  trainable = copy(jax.device_put(trainable, placement.trainable))
  opt_state, opt_sharding = parallel.init_opt_state(optimizer, trainable, placement.mesh)
  return trainable, opt_state, opt_sharding, dict(
      trainable_sharding=placement.trainable, opt_state_sharding=opt_sharding,
      params_sharding=placement.params, batch_sharding=placement.batch)


def _plot(metrics: list[dict], out_dir: epath.Path, name: str) -> epath.Path:
  target = out_dir / "curves.png"
  if not is_remote(out_dir):
    plot_curves(metrics, Path(str(target)), name)
    return target
  with tempfile.TemporaryDirectory() as tmp:
    plot_curves(metrics, Path(tmp) / "curves.png", name)
    target.write_bytes((Path(tmp) / "curves.png").read_bytes())
  return target


def fit(loss_fn: Callable[..., jax.Array], trainable: Any, params: Any,
        next_batch: Callable[[int], tuple[Any, int]], cfg: TrainConfig, *,
        evaluate: Callable[[Any], dict[str, float]], name: str = "run", mesh: jax.sharding.Mesh | None = None,
        trainable_sharding: Any = None, params_sharding: Any = None, batch_sharding: Any = None,
        identity: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
        on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
  """Trains ``trainable`` for ``cfg.steps`` steps of ``mos_jax.train.make_step``.

  With ``cfg.checkpoint_every > 0`` it saves (asynchronously, keeping the last
  ``cfg.keep_checkpoints``) the trainable pytree, optimizer state, dropout key,
  step and data position to ``out_dir/checkpoints`` every that many steps, at
  the end, and after the current step on a preemption notice (SIGTERM; then
  raises :class:`Interrupted`). The one resume rule: existing checkpoints are
  continued from the newest readable one with ``cfg.resume`` (giving the same
  values and losses as an uninterrupted run) and refused without it; a
  checkpoint of another model, adapter, training config or ``identity`` is
  refused with the differences listed.

  Args:
    loss_fn: ``loss_fn(trainable, params, batch, dropout_rng) -> scalar``; only
      ``trainable`` is differentiated, ``params`` (the frozen base) is a constant input.
    trainable: initial trainable pytree: an :class:`mos_jax.Adapter`, a dict
      holding one and a head, or full params. Checkpoints carry (and check) the
      identity of every adapter in it (``mos_jax.train.TrainCheckpointer`` does).
      The caller's arrays are not consumed.
    params: the frozen base params; never updated. With ``mesh``, already placed.
    next_batch: ``next_batch(step) -> (batch, examples in it)``, deterministic. If
      it has ``get_state() -> JSON`` and ``set_state(state)``, checkpoints store
      that state; otherwise a resumed run replays its first batches. With
      ``mesh`` in several processes it returns the global batch (e.g. from
      :func:`mos_jax.parallel.global_batch`, each process loading its own rows).
    cfg: optimizer, schedule, steps, evaluation period, seed, run folder (local or
      ``gs://``), checkpoints.
    evaluate: ``evaluate(trainable) -> {"eval_...": value}``, run every
      ``cfg.eval_every`` steps and after the last (by every process).
    name: label of the progress bar and the plot.
    mesh: train on this device mesh (every process calls :func:`fit`); ``None``
      runs where the inputs are.
    trainable_sharding: with ``mesh``: the trainable's shardings (default: pools
      replicated, as :func:`mos_jax.parallel.pool_shardings`).
    params_sharding: with ``mesh``: the params' shardings (default: their own).
    batch_sharding: with ``mesh``: the batch's (default: rows over ``data`` x ``fsdp``).
    identity: more JSON that a checkpoint must match (the data, the model source).
    log: where one-line notices go (process 0 only; default ``print``).
    on_step: called with each step's metrics row (on process 0), e.g. to print a line per step.

  Returns:
    ``{"trainable", "metrics", "step_seconds", "metrics_path", "plot_path", "resumed_from"}``;
    the step time is the median after the first steps (which include compilation); ``metrics``
    are every logged row on process 0 (the other processes get this run's rows only).

  Raises:
    Interrupted: a preemption notice arrived; the last finished step is checkpointed.
    FileExistsError: checkpoints exist but ``cfg.resume`` is off.
  """
  require_filesystem(cfg.out_dir)
  out_dir = epath.Path(cfg.out_dir)
  main = parallel.is_main_process()
  say = (log or (lambda text: print(text, flush=True))) if main else (lambda text: None)
  if not is_remote(out_dir):  # a bucket has no folders to make
    out_dir.mkdir(parents=True, exist_ok=True)
  optimizer = make_optimizer(cfg)
  placement = None if mesh is None else Placement.on(mesh, trainable, params, trainable_sharding=trainable_sharding,
                                                     params_sharding=params_sharding, batch_sharding=batch_sharding)
  trainable, opt_state, _, shardings = _place(trainable, optimizer, placement)
  step = mos_jax.train.make_step(loss_fn, optimizer, **shardings)
  make_key = lambda: jax.random.key(cfg.seed + 1)  # noqa: E731
  # On a mesh the key is made replicated there (a one-device array cannot be put on other processes' devices).
  dropout_key = make_key() if placement is None else jax.jit(
      make_key, out_shardings=NamedSharding(placement.mesh, P()))()
  lr_at = learning_rate(cfg)
  metrics: list[dict] = []
  step_times = []
  metrics_path = out_dir / "metrics.jsonl"
  resumed_from = None
  with contextlib.ExitStack() as cleanup:
    first, ckpt = 1, None
    if cfg.checkpoint_every:
      # Leaving the block closes the checkpointer, which waits for pending saves to commit.
      ckpt = cleanup.enter_context(_checkpointer(cfg, out_dir, params, identity))
      if ckpt.all_steps():
        if not cfg.resume:
          raise FileExistsError(f"{ckpt.directory} holds checkpoints of steps {ckpt.all_steps()}: pass "
                                "resume=True to continue that run, or use a fresh out_dir.")
        # Restores onto the live shardings, whatever mesh wrote the checkpoint.
        restored = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "dropout_key": dropout_key})
        trainable, opt_state, dropout_key = (restored.state[k] for k in ("trainable", "opt_state", "dropout_key"))
        first, resumed_from = restored.step + 1, restored.step
        _seek(next_batch, restored.data_state, restored.step)
        say(f"{name}: resumed from step {restored.step}")
    logger = cleanup.enter_context(contextlib.closing(
        JsonlLog(metrics_path, keep_until=resumed_from))) if main else None
    if logger is not None:
      metrics = logger.rows()
    notice = parallel.preemption_notice() if ckpt is not None else contextlib.nullcontext(lambda s: False)
    reached = cleanup.enter_context(notice)
    # Every process reports its first step before a notice can land (JAX's preemption sync rule).
    if reached(first - 1):
      say(f"{name}: preempted before step {first}; the checkpoint of step {first - 1} stands")
      raise Interrupted(first - 1)
    bar = tqdm(range(first, cfg.steps + 1), initial=first - 1, total=cfg.steps, desc=name,
               disable=not (cfg.progress and main), dynamic_ncols=True)
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
      if on_step is not None and main:
        on_step(row)
      if logger is not None:
        logger.write(row)  # flushed: rows up to a checkpoint must survive a kill, for the resumed run to keep them
      bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k == "loss" or k.startswith("eval_")}
                      | {"ex/s": f"{row['examples_per_s']:.0f}"})
      stop = reached(i)
      if ckpt is not None and (stop or i == cfg.steps or ckpt.should_save(i)):
        iterator = next_batch.get_state() if hasattr(next_batch, "get_state") else None
        ckpt.save(i, {"trainable": trainable, "opt_state": opt_state, "dropout_key": dropout_key},
                  data_state={"position": i, "iterator": iterator}, force=True)
        if logger is not None:
          logger.sync()  # a bucket's log: the rows of every checkpointed step survive a lost VM
      if stop:
        ckpt.wait()
        say(f"{name}: preempted, saved step {i}; exiting for a later resume")
        raise Interrupted(i)
  plot_path = _plot(metrics, out_dir, name) if main and metrics else out_dir / "curves.png"
  steady = step_times[len(cfg.length_buckets) + 2:] or step_times
  # A run resumed from its last step trains no further step, so it has no step time.
  step_seconds = float(np.median(steady)) if steady else float("nan")
  return {"trainable": trainable, "metrics": metrics, "step_seconds": step_seconds,
          "metrics_path": metrics_path, "plot_path": plot_path, "resumed_from": resumed_from}
