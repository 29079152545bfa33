"""MoS training on a device mesh, single- or multi-host: the entry point the tpu/ scripts launch.

A config file (big_vision style: a Python file defining ``CONFIG = RunConfig(...)``) sets the
model, the MoS adapter, the (data, fsdp, tensor) mesh and the run. The frozen base is
FSDP/tensor-sharded by rule, pools replicated, batches split over data x fsdp, and the step
(`mos_jax.linen.make_train_step` with the four shardings) is jitted with explicit in/out shardings
and donated adapter/optimizer state. Each process builds only the rows of the global batch its
devices hold. On a Cloud TPU VM, `jax.distributed` starts from the slice's metadata.

Checkpoints (Orbax) every `checkpoint_every` steps and at the end; resumes from the latest one.
A preemption notice (SIGTERM to any process) stops every process after the same step, which is
checkpointed, and the run exits with status 143 (`PREEMPTED_EXIT`); a finished run exits 0 and
process 0 writes the native adapter file `workdir/adapter.safetensors` (`mos_jax.load_adapter`
reads it). `workdir` may be a bucket (`gs://...`, needs the `[gcs]` extra); `metrics.jsonl` is
then written locally and uploaded whole at each checkpoint and at exit.

    .venv/bin/python -m experiments.train_sharded --config experiments/configs/tiny_sharded.py --workdir runs/sharded
    # several processes (one per host): add --coordinator HOST:PORT --num-processes N --process-id I
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.lib.workdir import JsonlLog, is_remote, require_filesystem

if TYPE_CHECKING:  # imported at run time only after jax is configured (device count)
  from mos_jax import MoSConfig
  from mos_jax.parallel import MeshConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A random Llama of this shape (when `RunConfig.hf_model` is not set)."""

  hidden: int = 64
  intermediate: int = 128
  layers: int = 4
  heads: int = 4
  kv_heads: int = 2
  vocab: int = 128


@dataclasses.dataclass(frozen=True)
class RunConfig:
  mos: "MoSConfig"
  mesh: "MeshConfig"
  model: ModelConfig = ModelConfig()
  hf_model: str | None = None
  global_batch: int = 8
  seq_len: int = 32
  steps: int = 10
  lr: float = 1e-3
  warmup_frac: float = 0.0
  schedule: str = "linear"  # decay after the warmup: "linear" or "cosine"
  clip_norm: float = 1.0
  weight_decay: float = 1e-4  # AdamW's (optax's default)
  compute_dtype: str = "float32"
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  fsdp_min_size: int = 0
  seed: int = 0


#: Exit status after a preemption checkpoint, as for a process ended by SIGTERM (128 + 15): the
#: tpu/ scripts relaunch on it, and read 0 as "training finished".
PREEMPTED_EXIT = 143


def load_config(path: str) -> RunConfig:
  """``CONFIG`` of a config file, which imports ``RunConfig`` from ``experiments.train_sharded``."""
  if __name__ == "__main__":
    # Run with -m, this module is __main__: let the config file's import find this very module
    # (a second copy would define another RunConfig class).
    sys.modules.setdefault("experiments.train_sharded", sys.modules[__name__])
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not isinstance(getattr(module, "CONFIG", None), RunConfig):
    raise ValueError(f"{path} must define CONFIG = RunConfig(...).")
  return module.CONFIG


def token_rows(seed: int, step: int, start: int, stop: int, seq_len: int, vocab: int) -> np.ndarray:
  """Rows ``start:stop`` of step ``step``'s global batch: arithmetic sequences mod vocab.

  Each row depends only on (seed, step, row), so any process can build any rows.
  """
  rows = []
  for r in range(start, stop):
    rng = np.random.default_rng([seed, step, r])
    first, stride = rng.integers(0, vocab), rng.integers(1, 5)
    rows.append((first + stride * np.arange(seq_len)) % vocab)
  return np.asarray(rows, np.int32)


def build_model(cfg: RunConfig):
  import jax.numpy as jnp

  from experiments.lib.models import load_causal_lm, random_llama

  dtype = jnp.dtype(cfg.compute_dtype)
  if cfg.hf_model:
    return load_causal_lm(cfg.hf_model, allow_network=True, dtype=dtype)
  m = cfg.model
  return random_llama(vocab=m.vocab, hidden=m.hidden, intermediate=m.intermediate, layers=m.layers, heads=m.heads,
                      kv_heads=m.kv_heads, max_positions=max(64, cfg.seq_len), seed=cfg.seed, dtype=dtype)


def save_final_adapter(workdir: Any, adapter: Any) -> None:
  """``workdir/adapter.safetensors``; written locally first when ``workdir`` is a bucket (gs://...)."""
  import mos_jax

  target = workdir / "adapter.safetensors"
  if not is_remote(workdir):
    mos_jax.save_adapter(Path(str(target)), adapter)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = mos_jax.save_adapter(Path(tmp) / "adapter.safetensors", adapter)
    target.write_bytes(local.read_bytes())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="checkpoints and metrics (a gs:// bucket on pods)")
  parser.add_argument("--steps", type=int, default=None, help="override CONFIG.steps")
  parser.add_argument("--checkpoint-every", type=int, default=None, help="override CONFIG.checkpoint_every")
  parser.add_argument("--hf-model", default=None, help="override CONFIG.hf_model (the weights' folder)")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--cpu-devices", type=int, default=None, help="CPU devices per process (tests)")
  return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
  """``CONFIG`` of ``--config`` with the command line's overrides."""
  cfg = load_config(args.config)
  overrides = {"steps": args.steps, "checkpoint_every": args.checkpoint_every, "hf_model": args.hf_model}
  return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


#: RunConfig fields a resumed run may change: run length, checkpoint cadence and where the weights
#: are read from (a folder's path differs between machines; the adapter identity pins the base).
RESUMABLE = ("mos", "mesh", "steps", "checkpoint_every", "keep_checkpoints", "hf_model")


def main(argv: list[str] | None = None) -> int:
  """Trains; returns 0 when done, ``PREEMPTED_EXIT`` after a preemption checkpoint."""
  args = parse_args(argv)
  require_filesystem(args.workdir)  # before minutes of model loading, not at the first save

  import jax
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  import mos_jax
  from mos_jax import parallel
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)

  import jax.numpy as jnp
  import optax
  from etils import epath  # local paths and gs:// buckets alike (pods share a bucket)
  from jax.experimental import multihost_utils

  from experiments.lib.optim import make_optimizer

  cfg = run_config(args)
  main_process = parallel.is_main_process()
  workdir = epath.Path(args.workdir)
  if not is_remote(workdir):  # a bucket has no folders to make
    workdir.mkdir(parents=True, exist_ok=True)
  model = build_model(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  params_sharding = parallel.base_shardings(model.params, mesh, fsdp_min_size=cfg.fsdp_min_size)
  params = jax.device_put(model.params, params_sharding)
  adapter = mos_jax.adapt(model.params, cfg.mos)
  adapter_sharding = parallel.pool_shardings(adapter, mesh)
  adapter = jax.device_put(adapter, adapter_sharding)
  optimizer = make_optimizer(cfg)
  opt_state, opt_sharding = parallel.init_opt_state(optimizer, adapter, mesh)
  batch_sharding = parallel.batch_sharding(mesh)

  def loss_fn(params, batch):
    with jax.numpy_rank_promotion("allow"):
      logits = model(batch[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

  step_fn = mos_jax.linen.make_train_step(loss_fn, optimizer, trainable_sharding=adapter_sharding,
                                    opt_state_sharding=opt_sharding, params_sharding=params_sharding,
                                    batch_sharding=batch_sharding)
  checkpoints = mos_jax.TrainCheckpointer(
      workdir / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
      identity={"adapter": mos_jax.train.adapter_identity(adapter),
                "run": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE}})
  start = 0
  if checkpoints.latest_step() is not None:
    # Restores onto the live shardings, whatever mesh wrote the checkpoint.
    restored = checkpoints.restore({"adapter": adapter, "opt_state": opt_state})
    start, adapter, opt_state = restored.step, restored.state["adapter"], restored.state["opt_state"]
    if main_process:
      print(f"resumed from step {start}", flush=True)

  dropout_key = jax.random.key(cfg.seed + 1)
  metrics = JsonlLog(workdir / "metrics.jsonl", keep_until=start) if main_process else None
  step = start
  # A preemption notice (SIGTERM to any process) stops every process after the same step, which is
  # checkpointed; see mos_jax.parallel.preemption_notice.
  with parallel.preemption_notice() as reached:
    preempted = reached(step)  # every process reports its first step before the first notice can land
    while step < cfg.steps and not preempted:
      batch = parallel.global_batch(
          batch_sharding, (cfg.global_batch, cfg.seq_len),
          lambda a, b, s=step: token_rows(cfg.seed, s, a, b, cfg.seq_len, model.config.vocab_size))
      t0 = time.perf_counter()
      adapter, opt_state, loss = step_fn(adapter, opt_state, params, batch, jax.random.fold_in(dropout_key, step))
      loss = float(loss)
      step += 1
      if main_process:
        metrics.write({"step": step, "loss": loss, "seconds": time.perf_counter() - t0})
        print(f"step {step} loss {loss:.6f}", flush=True)
      preempted = reached(step)
      saved = checkpoints.save(step, {"adapter": adapter, "opt_state": opt_state},
                               force=preempted or step == cfg.steps)
      if saved and metrics:
        metrics.sync()  # the metrics of every checkpointed step survive a lost VM
  checkpoints.wait()
  if metrics:
    metrics.close()
  if preempted:
    print(f"process {jax.process_index()}: preempted, saved step {step}; exiting for a later resume", flush=True)
    checkpoints.close()
    return PREEMPTED_EXIT
  gathered = multihost_utils.process_allgather(adapter, tiled=True)  # every process takes part
  if main_process:
    save_final_adapter(workdir, gathered)
    print(f"training finished at step {step}", flush=True)
  checkpoints.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
