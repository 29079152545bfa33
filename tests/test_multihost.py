"""The sharded entry point (what tpu/ launches): two processes on loopback, preemption, resume."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mos_jax

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "tiny_sharded.py"
TIMEOUT = 300


def command(workdir, *extra):
  return [sys.executable, "-m", "experiments.train_sharded", "--config", str(CONFIG), "--workdir", str(workdir),
          *extra]


def env():
  # Each child sets its own device count; drop anything inherited from the test process.
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)} | {"PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def processes(commands):
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
                            start_new_session=True) for c in commands]
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)


def finish(procs):
  outputs = []
  deadline = time.monotonic() + TIMEOUT
  for p in procs:
    out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  return outputs


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def pools(workdir):
  """The final pools from the native adapter file, as ``{"group|A": array}``."""
  adapter = mos_jax.load_adapter(workdir / "adapter.safetensors")
  return {f"{g}|{k}": np.asarray(v) for g, e in adapter.pools.items() for k, v in e.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process with 4 CPU devices, 4 uninterrupted steps."""
  workdir = tmp_path_factory.mktemp("reference")
  with processes([command(workdir, "--cpu-devices", "4")]) as procs:
    finish(procs)
  return losses(workdir), pools(workdir)


def test_two_processes_agree_with_one(tmp_path, reference):
  port = free_port()
  cmds = [command(tmp_path, "--cpu-devices", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                  "--process-id", str(i)) for i in range(2)]
  with processes(cmds) as procs:
    finish(procs)
  ref_losses, ref_pools = reference
  np.testing.assert_allclose(losses(tmp_path), ref_losses, rtol=1e-5)
  got = pools(tmp_path)
  assert got.keys() == ref_pools.keys()
  for k in got:
    assert np.linalg.norm(got[k] - ref_pools[k]) <= 1e-5 * np.linalg.norm(ref_pools[k]), k


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, reference):
  with processes([command(tmp_path, "--cpu-devices", "4")]) as (proc,):
    for line in proc.stdout:  # wait for the first completed step, then preempt
      if line.startswith("step 1 "):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM: saved step" in out
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 4, (saved, out[-2000:])
  with processes([command(tmp_path, "--cpu-devices", "4")]) as procs:
    (out,) = finish(procs)
  assert f"resumed from step {saved[-1]}" in out
  ref_losses, ref_pools = reference
  assert losses(tmp_path) == ref_losses  # same devices, same order: bit-identical
  for k, v in pools(tmp_path).items():
    np.testing.assert_array_equal(v, ref_pools[k])
