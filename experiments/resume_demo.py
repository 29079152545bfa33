"""Preemption demo: SIGTERM a training process from outside, resume it, compare with an unbroken run.

Three child processes fine-tune the same tiny random Llama with MoS through
``experiments.lib.lm.train_lm`` (random token data, so nothing to download):

  full      uninterrupted, no checkpoints;
  killed    checkpoints every ``--every`` steps; this script sends it SIGTERM once
            ``--kill-after`` steps are logged: it finishes its step, checkpoints
            it and exits with status 143;
  resumed   the same command with ``resume=True`` in the same folder.

It then checks that the resumed run's per-step losses and final pools equal the
unbroken run's bit for bit, and prints the sizes of what a run leaves: one
checkpoint step (pools + AdamW moments + key + metadata), the native MoS adapter
file, and the same adapter exported as a PEFT LoRA adapter (LoRA at MoS's
active rank). Exit status 0 iff the runs match.

Run (about a minute on 2 CPU cores):
  .venv/bin/python -m experiments.resume_demo
  .venv/bin/python -m experiments.resume_demo --steps 200 --kill-after 120 --out runs/resume_demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import mos_jax
from experiments.lib.paths import REPO

MOS = dict(rank=8, equivalent_rank=2, shards_per_vector=2, dropout=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=150, help="training steps of every run")
  p.add_argument("--every", type=int, default=10, help="checkpoint every this many steps")
  p.add_argument("--kill-after", type=int, default=60, help="send SIGTERM once this many steps are logged")
  p.add_argument("--out", default="runs/resume_demo", help="output folder (replaced)")
  p.add_argument("--child", choices=["full", "killed", "resumed"], help=argparse.SUPPRESS)
  return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
  """One training run; writes the trained adapter as a native file and as a PEFT export."""
  from experiments.lib.config import TrainConfig
  from experiments.lib.lm import LMData, train_lm
  from experiments.lib.models import random_llama

  model = random_llama(vocab=128, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, max_positions=128)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, size=(64, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  data = LMData(ids, mask, np.concatenate([np.zeros((64, 8), np.int32), mask[:, 8:]], axis=1))
  name = "full" if args.child == "full" else "run"
  cfg = TrainConfig(mos=mos_jax.MoSConfig(**MOS), lr=3e-3, steps=args.steps, batch_size=8, eval_every=50,
                    progress=False, out_dir=str(Path(args.out) / name),
                    checkpoint_every=0 if args.child == "full" else args.every,
                    resume=args.child == "resumed")
  result = train_lm(model, model.params, data, data, cfg, name=args.child)
  mos_jax.save_adapter(Path(cfg.out_dir) / "final.safetensors", result["adapter"])
  mos_jax.export_peft(Path(cfg.out_dir) / "peft", result["adapter"])


def spawn(args: argparse.Namespace, which: str) -> subprocess.Popen:
  # As a module from the repository root; --out made absolute, so it names the same folder there.
  cmd = [sys.executable, "-m", "experiments.resume_demo", "--child", which, "--steps", str(args.steps),
         "--every", str(args.every), "--out", str(Path(args.out).resolve())]
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(proc: subprocess.Popen, which: str, expect: int = 0) -> None:
  _, err = proc.communicate()
  if proc.returncode != expect:
    raise SystemExit(f"{which} run exited with {proc.returncode}, expected {expect}:\n{err[-3000:]}")


def logged_steps(path: Path) -> int:
  return len(path.read_text().splitlines()) if path.exists() else 0


def du(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
  args = parse_args()
  if args.child:
    child(args)
    return
  if not 0 < args.kill_after < args.steps:
    raise SystemExit("--kill-after must lie strictly between 0 and --steps.")
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  full = spawn(args, "full")  # runs alongside the killed one
  try:
    compare(args, out, full)
  finally:
    full.kill()  # a no-op once it has finished


def compare(args: argparse.Namespace, out: Path, full: subprocess.Popen) -> None:
  killed = spawn(args, "killed")
  metrics = out / "run" / "metrics.jsonl"
  while logged_steps(metrics) < args.kill_after and killed.poll() is None:
    time.sleep(0.005)
  if killed.poll() is not None:
    raise SystemExit(f"The run ended before {args.kill_after} steps were logged; see its errors:\n"
                     f"{killed.stderr.read()[-3000:]}")
  killed.send_signal(signal.SIGTERM)
  finish(killed, "killed", expect=128 + signal.SIGTERM)
  stopped = logged_steps(metrics)
  checkpoints = sorted(int(p.name) for p in (out / "run" / "checkpoints").iterdir() if p.name.isdigit())

  finish(spawn(args, "resumed"), "resumed")
  finish(full, "full")

  rows = {name: [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
          for name in ("full", "run")}
  same_losses = [r["loss"] for r in rows["full"]] == [r["loss"] for r in rows["run"]]
  pools = {name: mos_jax.load_adapter(out / name / "final.safetensors").pools for name in ("full", "run")}
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree_util.tree_leaves(pools["full"]), jax.tree_util.tree_leaves(pools["run"])))
  step_dir = out / "run" / "checkpoints" / str(args.steps)  # the final step is always saved
  print(f"SIGTERM after {args.kill_after} logged steps: the run stopped after step {stopped} "
        f"(checkpoints then: {checkpoints}), exit status 143; resumed from step {checkpoints[-1]}.")
  print(f"per-step losses identical to the unbroken run: {same_losses} ({len(rows['run'])} steps)")
  print(f"final pools, max |resumed - unbroken|: {diff:.3g}")
  print()
  print(f"{'file':<46} {'bytes':>10}")
  print(f"{'checkpoint step (pools + AdamW + key + meta)':<46} {du(step_dir):>10,}")
  print(f"{'native MoS adapter (pools + routing + config)':<46} {du(out / 'run' / 'final.safetensors'):>10,}")
  print(f"{'PEFT LoRA export, r=' + str(MOS['rank']) + ' (same active rank)':<46} "
        f"{du(out / 'run' / 'peft' / 'adapter_model.safetensors'):>10,}")
  if not (same_losses and diff == 0.0):
    raise SystemExit("The resumed run differs from the unbroken one.")


if __name__ == "__main__":
  main()
