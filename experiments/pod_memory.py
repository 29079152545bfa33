"""Memory per chip of the pod configs, before any weight exists: the table in docs/training.md.

For each config file (default: every ``experiments/configs/*`` made for an accelerator), the model's
config.json (the hub's values, ``experiments.lib.chip_memory.HF_CONFIGS``, or a local folder's) on the
config's mesh over the accelerator's chip count: the sharded bf16 base (exact shard shapes), MoS's state
and factors, the activations and logits (estimates), against the chip's memory. The same numbers
``python -m experiments.train`` prints before it loads a model.

    .venv/bin/python -m experiments.pod_memory                 # every config, as a markdown table
    .venv/bin/python -m experiments.pod_memory experiments/configs/gemma3_27b_v5e16.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def hf_config(model: str) -> dict:
  from experiments.lib import chip_memory, nnx_models

  name = model.removeprefix("hf://")
  if name in chip_memory.HF_CONFIGS:
    return chip_memory.HF_CONFIGS[name]
  return nnx_models.read_config(model)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("configs", nargs="*", help="config files (default: every accelerator config)")
  p.add_argument("--json", help="also write the rows here")
  args = p.parse_args(argv)

  from experiments.lib.run_config import load_config
  configs = args.configs or sorted(str(f) for f in (ROOT / "experiments" / "configs").glob("*.py"))
  loaded = [(path, load_config(path)) for path in configs]
  loaded = [(path, cfg) for path, cfg in loaded if cfg.accelerator and cfg.model]
  from experiments.lib import chip_memory
  chips = max(chip_memory.chips_of(cfg.accelerator) for _, cfg in loaded)
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", chips)
  from mos_jax import parallel

  rows = []
  print("| config | model | slice | mesh (data, fsdp, tensor) | batch x seq | remat | base | MoS state + factors "
        "| activations + logits | total / HBM per chip | fits |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for path, cfg in loaded:
    n = chip_memory.chips_of(cfg.accelerator)
    mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:n])
    memory, _ = chip_memory.plan(cfg, hf_config(cfg.model), mesh)
    limit = cfg.hbm_gib * cfg.usable_fraction
    gib = lambda b: b / chip_memory.GIB  # noqa: E731
    row = {"config": Path(path).name, "model": cfg.model.removeprefix("hf://"), "accelerator": cfg.accelerator,
           "mesh": tuple(mesh.shape.values()), "global_batch": cfg.global_batch, "seq_len": cfg.seq_len,
           "remat": cfg.remat, "hbm_gib": cfg.hbm_gib, **{k: gib(v) for k, v in vars(memory).items()},
           "total_gib": gib(memory.total), "fits": gib(memory.total) <= limit}
    rows.append(row)
    print(f"| {row['config']} | {row['model']} | {cfg.accelerator} | {row['mesh']} | {cfg.global_batch} x "
          f"{cfg.seq_len} | {cfg.remat} | {row['base']:.2f} | {row['mos_state'] + row['factors']:.2f} | "
          f"{row['activations'] + row['logits']:.2f} | {row['total_gib']:.2f} / {cfg.hbm_gib:g} | "
          f"{'yes' if row['fits'] else 'NO'} |")
  print(f"\nGiB per chip; 'fits' means the total is within {loaded[0][1].usable_fraction:.0%} of the chip's memory.")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
  return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
