"""Sharded MoS train-step time versus device count (strong scaling at a fixed global batch).

For each device count n (each in a fresh process, since JAX fixes the device count at start)
the same small Llama + MoS step runs data-parallel on an (n, 1, 1) mesh and FSDP on a (1, n, 1)
mesh; the table gives the median step time and the scaling efficiency t(1) / (n * t(n)).
On CPU the "devices" share the host's cores, so this measures the sharding machinery's
overhead, not speed-up; on a GPU/TPU host it measures real scaling. Processes cannot be interleaved
round by round, so each row gives its median step with a 95% bootstrap interval, and the
efficiency an interval from resampling both rows' steps; the load average before and after is
recorded, and --threads pins every worker (they inherit the pinning).

    .venv/bin/python -m experiments.bench_scaling [--devices 1 2 4 8] [--quick] [--threads 1] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments.lib import bench
from experiments.lib.paths import REPO, RESULTS_DIR

OUT = RESULTS_DIR / "bench_scaling.json"


def worker(n: int, mode: str, quick: bool) -> dict:
  import jax
  jax.config.update("jax_num_cpu_devices", n)  # only the CPU backend reads it; must precede any use
  import jax.numpy as jnp
  import numpy as np
  import optax

  import mos_jax
  from mos_jax import parallel
  from experiments.lib.models import random_llama
  hidden, layers, batch, seq = (64, 8, 8, 32) if quick else (256, 8, 16, 128)
  # max_positions: LlamaConfig's default (2048), as this benchmark always ran.
  model = random_llama(vocab=1024, hidden=hidden, intermediate=2 * hidden, layers=layers, heads=4, kv_heads=2,
                       max_positions=2048)
  devices = jax.devices()[:n]
  mesh = parallel.make_mesh(parallel.MeshConfig(data=n, fsdp=1) if mode == "data" else
                            parallel.MeshConfig(data=1, fsdp=n), devices)
  adapter = mos_jax.adapt(model.params, mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2))
  ps = parallel.base_shardings(model.params, mesh, fsdp_min_size=0)
  qs = parallel.pool_shardings(adapter, mesh)
  bs = parallel.batch_sharding(mesh)
  optimizer = optax.adamw(1e-3)
  params, adapter = jax.device_put(model.params, ps), jax.device_put(adapter, qs)
  opt_state, os_ = parallel.init_opt_state(optimizer, adapter, mesh)

  def loss_fn(params, ids):
    with jax.numpy_rank_promotion("allow"):
      logits = model(ids[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  step = mos_jax.linen.make_train_step(loss_fn, optimizer, trainable_sharding=qs, opt_state_sharding=os_,
                                 params_sharding=ps, batch_sharding=bs)
  ids = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, 1024, (batch, seq)), jnp.int32), bs)
  key = jax.random.key(0)
  adapter, opt_state, loss = step(adapter, opt_state, params, ids, key)  # compile
  jax.block_until_ready(loss)
  times = []
  for _ in range(3 if quick else 10):
    t = time.perf_counter()
    adapter, opt_state, loss = step(adapter, opt_state, params, ids, key)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  return {"devices": n, "mode": mode, "step_s": float(np.median(times)), "times_s": [float(t) for t in times],
          "loss": float(loss), "backend": jax.default_backend(), "device_kind": devices[0].device_kind}


def efficiency(base: dict, row: dict) -> dict:
  """``t(1)·n(1) / (n·t(n))`` from the medians, with a 95% interval from resampling both rows' steps."""
  rng = np.random.default_rng(bench.BOOTSTRAP_SEED)
  tb, tr = np.asarray(base["times_s"]), np.asarray(row["times_s"])
  boot = [np.median(rng.choice(tb, tb.size)) * base["devices"] / (row["devices"] * np.median(rng.choice(tr, tr.size)))
          for _ in range(2000)]
  value = base["step_s"] * base["devices"] / (row["devices"] * row["step_s"])
  return {"median": float(value), "ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])], "rounds": int(tr.size)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--quick", action="store_true")
  bench.add_threads_flag(parser)
  parser.add_argument("--out", type=Path, default=OUT)
  parser.add_argument("--worker", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.quick)))
    return
  run = bench.run_info(args)
  rows = []
  for mode in ("data", "fsdp"):
    for n in args.devices:
      cmd = [sys.executable, "-m", "experiments.bench_scaling", "--worker", str(n), mode] + \
          (["--quick"] if args.quick else [])
      out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
      row = json.loads(out.stdout.strip().splitlines()[-1])
      _, low, high = bench.median_ci(row["times_s"])
      rows.append({**row, "step_s_ci95": [low, high]})
  print(f"{'mesh':<6} {'devices':>7} {'step ms [95% CI]':>24} {'efficiency [95% CI]':>24}  "
        f"({rows[0]['backend']}, {rows[0]['device_kind']})")
  for row in rows:
    base = next(r for r in rows if r["mode"] == row["mode"] and r["devices"] == args.devices[0])
    row["efficiency"] = efficiency(base, row)
    lo, hi = row["step_s_ci95"]
    step = f"{1e3 * row['step_s']:.1f} [{1e3 * lo:.1f}, {1e3 * hi:.1f}]"
    print(f"{row['mode']:<6} {row['devices']:>7} {step:>24} {bench.fmt_ratio(row['efficiency'], 2):>24}")
  bench.write_json(str(args.out), {"rows": rows, "quick": args.quick}, run)


if __name__ == "__main__":
  main()
