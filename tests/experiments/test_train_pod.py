"""`python -m experiments.train` as the pod runs it, on CPU processes: the recipe of tpu/README.md, end to end.

A tiny Gemma 3 saved by transformers in HF layout (bf16 safetensors in 4 shards with an index), a JSONL
instruction file, 2 processes x 4 CPU devices on a fsdp=4 x tensor=2 mesh (jax.distributed over loopback,
gloo collectives), PyTorch import blocked in the workers, the run folder in a (fake) GCS bucket. One
process is killed mid-run (as a lost VM), the run is relaunched, and the final adapter file equals an
uninterrupted run's byte for byte. Also: two processes agree with one, and a SIGTERM to one process of two
stops both after one agreed, checkpointed step.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import mos_jax
from oracles.fake_gcs import BUCKET
from oracles.helpers import REPO_ROOT, assert_close

CONFIG = REPO_ROOT / "experiments" / "configs" / "tiny_gemma3_cpu.py"
TIMEOUT = 600
PREEMPTED = 143  # experiments.train.PREEMPTED_EXIT
# The workers run the module with PyTorch unimportable: the path to a pod never needs it.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'experiments.train'; "
            "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)")

pytestmark = pytest.mark.slow


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(model, data, workdir, *extra, processes=2, devices=4):
  base = [sys.executable, "-c", NO_TORCH, "--config", str(CONFIG), "--model", str(model), "--data", str(data),
          "--workdir", str(workdir), "--mesh", "fsdp=4,tensor=2", "--no-progress", "--cpu-devices", str(devices),
          *extra]
  if processes == 1:
    return [base]
  port = free_port()
  return [base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
          for i in range(processes)]


def env(extra=None):
  # Deterministic XLA on CPU: one thread per op, so a resumed run computes exactly what an unbroken one does.
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (extra or {}) | {
      "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
      "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}


@contextlib.contextmanager
def processes(cmds, logs, extra_env=None):
  files = [open(log, "w") for log in logs]
  procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, text=True, env=env(extra_env), cwd=logs[0].parent,
                            start_new_session=True) for c, f in zip(cmds, files)]
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)
    for f in files:
      f.close()


def finish(procs, logs, code=0):
  deadline = time.monotonic() + TIMEOUT
  for p in procs:
    p.wait(timeout=max(1, deadline - time.monotonic()))
  texts = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [code] * len(procs), "\n".join(t[-3000:] for t in texts)
  return texts


def wait_for(predicate, what, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError(what)
    time.sleep(0.2)


def logs(tmp_path, name, n=2):
  return [tmp_path / f"{name}{i}.log" for i in range(n)]


def run(model, data, workdir, tmp_path, name, *extra, processes_=2, extra_env=None):
  files = logs(tmp_path, name, processes_)
  with processes(commands(model, data, workdir, *extra, processes=processes_), files, extra_env) as procs:
    return finish(procs, files)


def test_killed_and_relaunched_pod_run_ends_with_the_same_adapter_file(tmp_path, tiny_gemma3, instruction_rows,
                                                                       fake_gcs):
  from etils import epath

  bucket = lambda path: epath.Path(f"gs://{BUCKET}/{path}")  # noqa: E731
  run(tiny_gemma3, instruction_rows, f"gs://{BUCKET}/reference", tmp_path, "reference", extra_env=fake_gcs)
  reference = bucket("reference/adapter.safetensors").read_bytes()

  files = logs(tmp_path, "killed")
  with processes(commands(tiny_gemma3, instruction_rows, f"gs://{BUCKET}/run"), files, fake_gcs) as procs:
    # Step 2 is checkpointed (committed: Orbax renames the finished folder into place), then one VM dies.
    step_2 = bucket("run/checkpoints/2")
    wait_for(lambda: (step_2.exists() and ocp.path.step.is_checkpoint_finalized(step_2))
             or any(p.poll() is not None for p in procs), "no checkpoint of step 2")
    assert all(p.poll() is None for p in procs), files[0].read_text()[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGKILL)  # a lost host takes the slice down: tpu/resume.sh relaunches everything
  killed_at = max(int(p.name) for p in bucket("run/checkpoints").iterdir()
                  if p.name.isdigit() and ocp.path.step.is_checkpoint_finalized(p))
  assert killed_at < 6 and not bucket("run/adapter.safetensors").exists()

  texts = run(tiny_gemma3, instruction_rows, f"gs://{BUCKET}/run", tmp_path, "resumed", extra_env=fake_gcs)
  assert f"resumed from step {killed_at}" in texts[0] and "training finished at step 6" in texts[0]
  assert bucket("run/adapter.safetensors").read_bytes() == reference
  rows = [json.loads(line) for line in bucket("run/metrics.jsonl").read_text().splitlines()]
  reference_rows = [json.loads(line) for line in bucket("reference/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert [r["loss"] for r in rows] == [r["loss"] for r in reference_rows]
  assert "eval_loss" in rows[-1] and rows[-1]["eval_loss"] == reference_rows[-1]["eval_loss"]
  assert len({r["loss"] for r in rows}) == 6  # the losses move: equal lists are no coincidence
  # The generation eval (2 held-out prompts, greedy) ran on the trained adapter, the same in both runs.
  generations = bucket("run/generations.jsonl").read_text()
  assert len(generations.splitlines()) == 2 and generations == bucket("reference/generations.jsonl").read_text()


def pools(path):
  adapter = mos_jax.load_adapter(path)
  return {f"{g}|{k}": np.asarray(v) for g, e in adapter.pools.items() for k, v in e.items()}


def test_two_processes_agree_with_one(tmp_path, tiny_gemma3, instruction_rows):
  # A float32 base: the two programs differ only in the collectives' summation order (a bf16 base would add
  # bf16 rounding of differently ordered sums, ~3e-3 of the pools after 6 AdamW steps).
  config = tmp_path / "float32.py"
  config.write_text(f"import dataclasses, runpy\nCONFIG = dataclasses.replace(runpy.run_path({str(CONFIG)!r})"
                    "['CONFIG'], dtype='float32')\n")
  one = commands(tiny_gemma3, instruction_rows, tmp_path / "one", "--config", str(config), processes=1, devices=8)
  with processes(one, [tmp_path / "one.log"]) as procs:
    finish(procs, [tmp_path / "one.log"])
  run(tiny_gemma3, instruction_rows, tmp_path / "two", tmp_path, "two", "--config", str(config))
  a, b = pools(tmp_path / "one" / "adapter.safetensors"), pools(tmp_path / "two" / "adapter.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    assert_close(b[k], a[k], rtol=1e-4)
  losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
  assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
  assert len(set(losses(tmp_path / "one"))) == 6


@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["both-1s-apart", "only-process-1"])
def test_sigterm_stops_every_process_after_one_checkpointed_step(tmp_path, tiny_gemma3, instruction_rows, signalled):
  """SIGTERM to some processes of a pod: all stop after one agreed step, which is checkpointed; a relaunch
  finishes the run."""
  files = logs(tmp_path, "run")
  workdir = tmp_path / "run"
  cmds = commands(tiny_gemma3, instruction_rows, workdir, "--steps", "400", "--checkpoint-every", "1000")
  with processes(cmds, files) as procs:
    wait_for(lambda: "step 3 " in files[0].read_text() or any(p.poll() is not None for p in procs), "no step 3")
    for n, i in enumerate(signalled):
      if n:
        time.sleep(1.0)
      procs[i].send_signal(signal.SIGTERM)
    texts = finish(procs, files, code=PREEMPTED)
  steps = {int(line.split("saved step ")[1].split(";")[0]) for t in texts for line in t.splitlines()
           if "preempted, saved step" in line}
  assert len(steps) == 1, texts
  (step,) = steps
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step] and step >= 3
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] \
      == list(range(1, step + 1))
