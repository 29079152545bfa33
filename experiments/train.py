"""Train a MoS adapter on a Tunix NNX model (Gemma 3, Llama 3.x, Qwen 3) from HF safetensors, on instruction data.

One command for one CPU, one accelerator or a TPU pod slice (every host runs it):

    python -m experiments.train --model PATH --data PATH.jsonl --workdir DIR --steps N \\
        [--mesh fsdp=4,tensor=2] [--config FILE]

``--model``: a HF model folder (config.json, *.safetensors, tokenizer), ``gs://...`` or
``hf://ORG/NAME``; safetensors only. ``--data``: JSONL or Parquet rows ``{"prompt", "response"}``
or ``{"messages": [...]}``, local or ``gs://``. ``--workdir``: local or ``gs://``; it receives
``adapter.safetensors`` (``mos_jax.load_adapter`` reads it), ``metrics.jsonl`` (loss, and the
held-out loss every ``eval_every`` steps and at the end), Orbax checkpoints in ``checkpoints/``,
and with ``generate > 0`` ``generations.jsonl``. ``--config``: a Python file defining
``CONFIG = experiments.lib.run_config.RunConfig(...)`` (``experiments/configs/``); the flags
override it.

Before loading, it prints the memory per chip (exact for the sharded base, estimated for
activations) and refuses a run that does not fit, naming the fixes. The weights are read
sharded as they load (each host reads only its devices' slices, in bf16). The run resumes from
the newest checkpoint in ``--workdir`` (a checkpoint of another model, adapter or config is
refused). A SIGTERM to any process checkpoints the current step on every process and exits
with status 143; a finished run exits 0.

Several processes without a TPU: ``--coordinator HOST:PORT --num-processes N --process-id I``
(``--cpu-devices K`` gives each process K CPU devices, for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from experiments.lib.run_config import RunConfig, load_config, parse_mesh
from experiments.lib.workdir import is_remote, require_filesystem

#: Exit status after a preemption checkpoint (128 + SIGTERM): tpu/ relaunches on it; 0 means finished.
PREEMPTED_EXIT = 143


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="HF model folder, gs://... or hf://ORG/NAME (overrides CONFIG.model)")
  p.add_argument("--data", help="JSONL/Parquet instruction rows (overrides CONFIG.data)")
  p.add_argument("--eval-data", help="held-out rows (default: a share of --data)")
  p.add_argument("--workdir", required=True, help="run folder, local or gs://")
  p.add_argument("--steps", type=int)
  p.add_argument("--mesh", help="e.g. fsdp=4,tensor=2 (data takes the remaining devices)")
  p.add_argument("--config", help="a Python file defining CONFIG = RunConfig(...)")
  p.add_argument("--checkpoint-every", type=int)
  p.add_argument("--global-batch", type=int)
  p.add_argument("--seq-len", type=int)
  p.add_argument("--no-progress", action="store_true", help="a line per step instead of a progress bar (logs)")
  p.add_argument("--coordinator")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--cpu-devices", type=int, help="CPU devices per process (tests)")
  return p.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
  """The config file's ``CONFIG`` (or the defaults) with the command line's overrides."""
  cfg = load_config(args.config) if args.config else RunConfig()
  overrides = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "steps": args.steps,
               "checkpoint_every": args.checkpoint_every, "global_batch": args.global_batch, "seq_len": args.seq_len,
               "mesh": parse_mesh(args.mesh) if args.mesh else None}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in ("model", "data") if getattr(cfg, k) is None]
  if missing:
    raise SystemExit(f"Give {' and '.join('--' + k for k in missing)} (or set them in --config).")
  return cfg


def check_memory(cfg: RunConfig, mesh: Any, hf: dict, say: Any) -> None:
  """Prints the memory per chip and raises ``SystemExit`` with the fixes when it does not fit."""
  import jax

  from experiments.lib import chip_memory

  memory, fixes = chip_memory.plan(cfg, hf, mesh)
  hbm = cfg.hbm_gib
  if hbm is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    hbm = stats.get("bytes_limit", 0) / chip_memory.GIB or None
  say(memory.format(hbm))
  message = chip_memory.refusal(memory, hbm, cfg.usable_fraction, fixes) if hbm else None
  if message:
    raise SystemExit(message)


def check_writable(workdir: Any) -> None:
  """Writes and deletes a probe in the run folder, so a bucket without write access fails now, not at the first save.

  Raises:
    SystemExit: the probe cannot be written or deleted (the message names the permission to grant).
  """
  import uuid

  probe = workdir / f".preflight-{uuid.uuid4().hex}"
  try:
    if not is_remote(workdir):
      workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("mos_jax preflight\n")
    probe.unlink()
  except Exception as e:  # noqa: BLE001  (gcsfs, OS and HTTP errors alike)
    raise SystemExit(f"Cannot write to the run folder {workdir} ({type(e).__name__}: {e}). For a bucket, grant this "
                     "machine's service account roles/storage.objectAdmin on it; locally, check the path.") from e


def save_adapter_file(workdir: Any, adapter: Any) -> None:
  """``workdir/adapter.safetensors``; written locally first when ``workdir`` is a bucket."""
  import mos_jax

  target = workdir / "adapter.safetensors"
  if not is_remote(workdir):
    mos_jax.save_adapter(Path(str(target)), adapter)
    return
  with tempfile.TemporaryDirectory() as tmp:
    target.write_bytes(mos_jax.save_adapter(Path(tmp) / "adapter.safetensors", adapter).read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
  """Trains; returns 0 when done, ``PREEMPTED_EXIT`` after a preemption checkpoint."""
  args = parse_args(argv)
  cfg = run_config(args)
  require_filesystem(args.workdir)  # before minutes of model loading, not at the first save

  import jax
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from mos_jax import parallel
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)

  import jax.numpy as jnp
  import numpy as np
  from etils import epath
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  from transformers import AutoTokenizer

  import mos_jax
  from experiments.lib import chat_data, nnx_models
  from experiments.lib.loop import Interrupted, fit

  main_process = parallel.is_main_process()
  say = (lambda text: print(text, flush=True)) if main_process else (lambda text: None)
  mesh = parallel.make_mesh(cfg.mesh)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.global_batch % data_parallel:
    raise SystemExit(f"global_batch={cfg.global_batch} is not divisible by the data-parallel size {data_parallel} "
                     f"(mesh {dict(mesh.shape)}): use a multiple of {data_parallel}.")
  workdir = epath.Path(args.workdir)
  if main_process:
    check_writable(workdir)
  cache = nnx_models.default_cache_dir().parent
  folder = nnx_models.local_model_dir(cfg.model)
  hf = nnx_models.read_config(folder)
  family = nnx_models.family_of(hf)
  dtype = jnp.dtype(cfg.dtype)
  tunix_cfg = nnx_models.tunix_config(hf, family, dtype=dtype, remat=cfg.remat)
  mos = dataclasses.replace(cfg.mos, target_modules=cfg.targets or nnx_models.family_targets(family, tunix_cfg))
  say(f"{family.model_class} from {cfg.model}: {tunix_cfg.num_layers} layers, mesh {dict(mesh.shape)} over "
      f"{jax.process_count()} process(es)")
  check_memory(cfg, mesh, hf, say)

  loaded = nnx_models.load_model(folder, mesh, dtype=dtype, remat=cfg.remat)
  if loaded.unused:
    say(f"not used from the checkpoint: {len(loaded.unused)} tensors, e.g. {loaded.unused[:3]}")
  rngs = nnx.Rngs(dropout=cfg.seed) if mos.dropout > 0 else None
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(loaded.model, mos, rngs=rngs))
  replicated = NamedSharding(mesh, P())
  # The pools (and dropout keys) in the model state were made on one device: put them on the mesh.
  state_sharding = jax.tree_util.tree_map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh else replicated, state)
  state = jax.device_put(state, state_sharding)
  say(mos_jax.summary(adapter))

  tokenizer = AutoTokenizer.from_pretrained(str(folder))
  if tokenizer.chat_template is None:
    tokenizer.chat_template = family.chat_template
  records = chat_data.Records(cfg.data, cache)
  if cfg.eval_data:
    train_rows, eval_records = np.arange(len(records)), chat_data.Records(cfg.eval_data, cache)
    eval_rows = np.arange(min(len(eval_records), cfg.eval_max))
  else:
    train_rows, eval_rows = chat_data.split(len(records), eval_fraction=cfg.eval_fraction, eval_max=cfg.eval_max,
                                            seed=cfg.seed)
    eval_records = records
  batch_sharding = parallel.batch_sharding(mesh)
  batches = chat_data.InstructionBatches(records, train_rows, tokenizer, seq_len=cfg.seq_len,
                                         global_batch=cfg.global_batch, seed=cfg.seed, pack=cfg.pack,
                                         sharding=batch_sharding)

  def sums(adapter, state, batch, rng):
    model = mos_jax.nnx.bind(graphdef, adapter, state, rng=rng)
    h = nnx_models.hidden_states(model, batch["tokens"], batch["positions"],
                                 nnx_models.attention_mask(batch["segments"]))
    return nnx_models.token_nll(model, h, batch["targets"], batch["weights"], chunk=cfg.loss_chunk), \
        batch["weights"].sum()

  def loss_fn(adapter, state, batch, rng):
    nll, count = sums(adapter, state, batch, rng)
    return nll / jnp.maximum(count, 1.0)

  # Evaluation draws no dropout mask, but bind wants a key when the adapter has dropout.
  eval_sums = jax.jit(lambda a, s, b: sums(a, s, b, jax.random.key(cfg.seed + 2)),
                      in_shardings=(None, state_sharding, batch_sharding), out_shardings=(replicated, replicated))
  held_out = chat_data.InstructionBatches(eval_records, eval_rows, tokenizer, seq_len=cfg.seq_len,
                                          global_batch=cfg.global_batch, seed=cfg.seed, sharding=batch_sharding,
                                          ordered=True) \
      if len(eval_rows) else None

  def evaluate(trainable) -> dict[str, float]:
    if held_out is None:
      return {}
    # Every held-out row once, in order; the last batch's empty rows weigh nothing.
    nll = count = 0.0
    for step in range(1, -(-len(eval_rows) // cfg.global_batch) + 1):
      batch, _ = held_out(step)
      a, b = eval_sums(trainable, state, batch)
      nll, count = nll + float(a), count + float(b)
    return {"eval_loss": nll / max(count, 1.0)}

  train_cfg = cfg.train_config(args.workdir, progress=not args.no_progress)
  identity = {**cfg.identity(), "family": family.name, "data_rows": len(records)}
  try:
    result = fit(loss_fn, adapter, state, batches, train_cfg, evaluate=evaluate, name=f"MoS on {family.model_class}",
                 mesh=mesh, params_sharding=state_sharding, batch_sharding=batch_sharding, identity=identity, log=say,
                 on_step=(lambda row: say(f"step {row['step']} loss {row['loss']:.6f}")) if args.no_progress else None)
  except Interrupted as stop:
    say(f"process {jax.process_index()}: preempted, saved step {stop.step}; exiting for a later resume")
    return PREEMPTED_EXIT
  trained = result["trainable"]
  gathered = multihost_utils.process_allgather(trained, tiled=True)  # every process takes part
  if main_process:
    save_adapter_file(workdir, gathered)
    last = result["metrics"][-1] if result["metrics"] else {}
    say(f"training finished at step {cfg.steps}; held-out loss {last.get('eval_loss', float('nan')):.4f}; "
        f"adapter: {workdir / 'adapter.safetensors'}")
  if cfg.generate and len(eval_rows):
    from experiments.lib.generate import write_generations
    write_generations(workdir, graphdef, trained, state, tokenizer, eval_records, eval_rows[:cfg.generate],
                      mesh=mesh, state_sharding=state_sharding, seq_len=cfg.seq_len,
                      max_new_tokens=cfg.max_new_tokens, main=main_process)
  return 0


if __name__ == "__main__":
  sys.exit(main())
