"""Sequence-classification fine-tuning of a frozen HF Flax encoder with a MoS adapter.

Trainable: the adapter's pools plus a linear head on the masked mean of the last hidden
states; the base params are a constant input of the jitted step. AdamW with warmup and
linear or cosine decay, global-norm clipping, adapter dropout with a per-step key, a
float32/bfloat16 compute switch, periodic evaluation, a tqdm bar, metrics as JSONL and
a PNG of the curves. Deterministic given ``TrainConfig.seed``. Optional Orbax checkpoints
(every N steps, on SIGTERM and at the end) from which a run resumes bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from tqdm.auto import tqdm

import mos_jax
from mos_jax._io import atomic_file
from mos_jax._targets import path_str
from mos_jax._checkpoint import TrainCheckpointer, adapter_identity, tree_layout

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """One run. ``mos=None`` trains the head alone (the frozen-base floor)."""

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
    if self.schedule not in ("linear", "cosine"):
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


class Interrupted(SystemExit):
  """Raised by :func:`fit` after SIGTERM, once the last finished step is checkpointed.

  A ``SystemExit`` (status 143, as a process killed by SIGTERM), so an uncaught
  one ends the program cleanly; rerun with ``resume=True`` to continue.
  """

  def __init__(self, step: int):
    super().__init__(128 + signal.SIGTERM)
    self.step = step


@dataclasses.dataclass
class Dataset:
  """Tokenized split: int32 ``(n, max_len)`` inputs and ``(n,)`` labels."""

  inputs: dict[str, np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def check_dataset(data: Dataset, num_classes: int, name: str) -> None:
  """Fails before any training on data that cannot be trained on."""
  if len(data) == 0:
    raise ValueError(f"The {name} split is empty: nothing to train or evaluate on.")
  if "input_ids" not in data.inputs or "attention_mask" not in data.inputs:
    raise ValueError(f"The {name} split needs 'input_ids' and 'attention_mask', got {sorted(data.inputs)}.")
  bad = np.flatnonzero((data.labels < 0) | (data.labels >= num_classes))
  if bad.size:
    raise ValueError(f"The {name} split has labels outside 0..{num_classes - 1} (first at row {bad[0]}: "
                     f"{data.labels[bad[0]]}); fix the data or num_classes.")
  for key, value in data.inputs.items():
    if value.shape[0] != len(data):
      raise ValueError(f"The {name} split's {key} has {value.shape[0]} rows for {len(data)} labels.")


def schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = max(1, int(cfg.warmup_frac * cfg.steps))
  decay = (optax.cosine_decay_schedule(cfg.lr, max(1, cfg.steps - warmup)) if cfg.schedule == "cosine"
           else optax.linear_schedule(cfg.lr, 0.0, max(1, cfg.steps - warmup)))
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _trim(inputs: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
  # Pad only to the smallest bucket that fits the batch: few shapes, few compilations.
  longest = int(inputs["attention_mask"].sum(1).max())
  width = next((b for b in sorted(buckets) if b >= longest), inputs["input_ids"].shape[1])
  return {k: v[:, :width] for k, v in inputs.items()}


class Classifier:
  """Frozen encoder + optional MoS adapter + linear head, as pure functions."""

  def __init__(self, model: Any, params: Any, cfg: TrainConfig):
    if jnp.dtype(model.dtype) != jnp.dtype(cfg.compute_dtype):
      # HF Flax models fix the activation dtype at construction; rebuild without params.
      model = type(model)(model.config, dtype=jnp.dtype(cfg.compute_dtype), _do_init=False)
    self.model, self.params, self.cfg = model, params, cfg
    self.accepts = set(inspect.signature(model.__call__).parameters) & set(INPUT_KEYS)
    self.adapter = mos_jax.adapt(params, cfg.mos) if cfg.mos is not None else None
    hidden = model.config.hidden_size
    key = jax.random.key(cfg.seed)
    head = {"kernel": 0.02 * jax.random.normal(key, (hidden, cfg.num_classes), jnp.float32),
            "bias": jnp.zeros((cfg.num_classes,), jnp.float32)}
    self.init_trainable = {"head": head, "pools": self.adapter.pools if self.adapter else {}}

  def logits(self, trainable, params, inputs, dropout_rng=None) -> jax.Array:
    inject = (mos_jax.inject(mos_jax.assemble(trainable["pools"], self.adapter.routing),
                             self.adapter.routing, dropout_rng=dropout_rng)
              if self.adapter else contextlib.nullcontext())
    # HF Flax models rely on implicit rank promotion; keep it local to the model call.
    with inject, jax.numpy_rank_promotion("allow"):
      hidden = self.model(**{k: v for k, v in inputs.items() if k in self.accepts},
                          params=params).last_hidden_state
    mask = inputs["attention_mask"].astype(jnp.float32)[..., None]
    pooled = (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return pooled @ trainable["head"]["kernel"] + trainable["head"]["bias"][None, :]

  def loss(self, trainable, params, inputs, labels, dropout_rng=None) -> jax.Array:
    logits = self.logits(trainable, params, inputs, dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def trainable_count(self) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(self.init_trainable))


def save_adapter(out_dir: Path, adapter: mos_jax.Adapter | None, pools: Any, cfg: TrainConfig, *,
                 head: Any = None) -> Path | None:
  """The native MoS adapter file, the head (if any) and the run's ``adapter_config.json``.

  ``adapter.safetensors`` is :func:`mos_jax.save_mos_adapter`'s format (pools, routing,
  config), so :func:`mos_jax.load_mos_adapter` reads it back; a classifier's head goes
  to ``head.safetensors``. Returns the adapter file's path (``None`` without an adapter).
  """
  path = None
  if adapter is not None:
    path = mos_jax.save_mos_adapter(out_dir / "adapter.safetensors", pools, adapter.routing)
  if head is not None:
    flat = {path_str(key): np.asarray(leaf) for key, leaf in jax.tree_util.tree_flatten_with_path(head)[0]}
    atomic_file(out_dir / "head.safetensors", lambda p: save_file(flat, p))
  meta = {"train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "mos"},
          "mos": dataclasses.asdict(cfg.mos) if cfg.mos else None,
          "routing_version": mos_jax.ROUTING_VERSION,
          "groups": [g.name for g in adapter.routing.groups] if adapter else []}
  atomic_file(out_dir / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
  return path


def plot_curves(metrics: list[dict], path: Path, title: str) -> None:
  """Training loss (raw and smoothed) and the evaluation metric per step, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [m["step"] for m in metrics]
  losses = np.array([m["loss"] for m in metrics])
  ema = np.copy(losses)
  for i in range(1, len(ema)):
    ema[i] = 0.9 * ema[i - 1] + 0.1 * losses[i]
  eval_key = next((k for k in ("eval_accuracy", "eval_loss") if any(k in m for m in metrics)), None)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
  ax1.plot(steps, ema, lw=1.5, label="EMA 0.9")
  ax1.legend()
  ax1.set(xlabel="step", ylabel="train loss", title=title)
  if eval_key:
    evals = [m for m in metrics if eval_key in m]
    ax2.plot([m["step"] for m in evals], [m[eval_key] for m in evals], "o-")
  ax2.set(xlabel="step", ylabel=eval_key or "", title="evaluation")
  fig.tight_layout()
  atomic_file(path, lambda p: fig.savefig(p, format="png", dpi=110))
  plt.close(fig)


@contextlib.contextmanager
def _sigterm_flag(*, enabled: bool) -> Iterator[threading.Event]:
  """An event set by SIGTERM while the block runs (signals can only be caught in the main thread)."""
  flag = threading.Event()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _checkpointer(cfg: TrainConfig, out_dir: Path, params: Any,
                  routing: mos_jax.Routing | None) -> TrainCheckpointer:
  identity = {"train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES},
              "adapter": adapter_identity(routing) if routing is not None else None,
              "base_model": tree_layout(params)}
  return TrainCheckpointer(out_dir / "checkpoints", identity=identity, save_every=cfg.checkpoint_every,
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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(schedule(cfg), weight_decay=cfg.weight_decay))


def fit(loss_fn: Callable[..., jax.Array], trainable: Any, params: Any,
        next_batch: Callable[[int], tuple[Any, int]], cfg: TrainConfig, *,
        evaluate: Callable[[Any], dict[str, float]], name: str = "run",
        routing: mos_jax.Routing | None = None) -> dict[str, Any]:
  """The training loop shared by the experiments.

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
    trainable: initial trainable pytree (pools, head, ...).
    params: the frozen base params; never updated.
    next_batch: ``next_batch(step) -> (batch, examples in it)``, deterministic. If
      it has ``get_state() -> JSON`` and ``set_state(state)``, checkpoints store
      that state; otherwise a resumed run replays its first batches.
    cfg: optimizer, schedule, steps, evaluation period, seed, output folder, checkpoints.
    evaluate: ``evaluate(trainable) -> {"eval_...": value}``, run every
      ``cfg.eval_every`` steps and after the last.
    name: label of the progress bar and the plot.
    routing: the adapter's routing, so checkpoints carry (and check) its identity.

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

  @jax.jit
  def step(trainable, opt_state, params, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  trainable = jax.tree_util.tree_map(jnp.array, trainable)
  opt_state = optimizer.init(trainable)
  dropout_key = jax.random.key(cfg.seed + 1)
  lr_at = schedule(cfg)
  metrics: list[dict] = []
  step_times = []
  metrics_path = out_dir / "metrics.jsonl"
  with contextlib.ExitStack() as cleanup:
    first, ckpt = 1, None
    if cfg.checkpoint_every:
      # Leaving the block closes the checkpointer, which waits for pending saves to commit.
      ckpt = cleanup.enter_context(_checkpointer(cfg, out_dir, params, routing))
      if ckpt.all_steps():
        if not cfg.resume:
          raise FileExistsError(f"{ckpt.directory} holds checkpoints of steps {ckpt.all_steps()}: pass "
                                "resume=True to continue that run, or use a fresh out_dir.")
        restored = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "dropout_key": dropout_key})
        trainable, opt_state, dropout_key = (restored.state[k] for k in ("trainable", "opt_state", "dropout_key"))
        first = restored.step + 1
        _seek(next_batch, restored.data_state, restored.step)
        metrics = _metrics_until(metrics_path, restored.step)
    sigterm = cleanup.enter_context(_sigterm_flag(enabled=ckpt is not None))
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


class ShuffledBatches:
  """Batches of a fresh permutation per epoch; ``get_state``/``set_state`` let a resumed run continue it."""

  def __init__(self, data: Dataset, cfg: TrainConfig):
    self.data, self.cfg = data, cfg
    self.rng = np.random.default_rng(cfg.seed)
    self.order, self.cursor = self.rng.permutation(len(data)), 0

  def __call__(self, step: int) -> tuple[Any, int]:
    size = self.cfg.batch_size
    if self.cursor + size > len(self.data):
      self.order, self.cursor = self.rng.permutation(len(self.data)), 0
    idx = self.order[self.cursor:self.cursor + size]
    self.cursor += size
    inputs = _trim({k: v[idx] for k, v in self.data.inputs.items()}, self.cfg.length_buckets)
    return {"inputs": inputs, "labels": self.data.labels[idx]}, len(idx)

  def get_state(self) -> dict[str, Any]:
    return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "cursor": self.cursor}

  def set_state(self, state: dict[str, Any]) -> None:
    self.rng.bit_generator.state = state["rng"]
    self.order, self.cursor = np.asarray(state["order"], np.int64), state["cursor"]


def train(model: Any, params: Any, train_data: Dataset, eval_data: Dataset, cfg: TrainConfig,
          *, name: str = "run") -> dict[str, Any]:
  """Fine-tunes a classifier; writes metrics.jsonl, curves.png and the adapter to cfg.out_dir.

  Returns:
    ``{"metrics", "final_accuracy", "trainable", "step_seconds", "trainable_state",
    "adapter", "paths"}``.
  """
  check_dataset(train_data, cfg.num_classes, "train")
  check_dataset(eval_data, cfg.num_classes, "eval")
  clf = Classifier(model, params, cfg)

  @jax.jit
  def evaluate_batch(trainable, params, inputs, labels):
    logits = clf.logits(trainable, params, inputs)
    return ((logits.argmax(-1) == labels).sum(),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())

  def evaluate(trainable) -> dict[str, float]:
    correct = total_loss = 0.0
    for i in range(0, len(eval_data), cfg.eval_batch_size):
      inputs = _trim({k: v[i:i + cfg.eval_batch_size] for k, v in eval_data.inputs.items()}, cfg.length_buckets)
      c, l = evaluate_batch(trainable, params, inputs, eval_data.labels[i:i + cfg.eval_batch_size])
      correct, total_loss = correct + float(c), total_loss + float(l)
    return {"eval_accuracy": correct / len(eval_data), "eval_loss": total_loss / len(eval_data)}

  next_batch = ShuffledBatches(train_data, cfg)

  def loss_fn(trainable, params, batch, rng):
    return clf.loss(trainable, params, batch["inputs"], batch["labels"], rng)

  result = fit(loss_fn, clf.init_trainable, params, next_batch, cfg, evaluate=evaluate, name=name,
               routing=clf.adapter.routing if clf.adapter else None)
  adapter_path = save_adapter(Path(cfg.out_dir), clf.adapter, result["trainable"]["pools"], cfg,
                              head=result["trainable"]["head"])
  return {"metrics": result["metrics"], "final_accuracy": result["metrics"][-1]["eval_accuracy"],
          "trainable": clf.trainable_count(), "step_seconds": result["step_seconds"],
          "trainable_state": result["trainable"], "adapter": clf.adapter,
          "paths": {"metrics": result["metrics_path"], "plot": result["plot_path"], "adapter": adapter_path}}
