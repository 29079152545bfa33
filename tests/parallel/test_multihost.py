"""The multi-host set-up, as processes on loopback: `parallel.initialize()` starting `jax.distributed` from a
(fake) TPU metadata server with no `TPU_WORKER_HOSTNAMES`; global batches on a mesh whose device order
interleaves the processes, as a TPU pod's physical ring does. The training entry point's multi-process runs
(agreement with one process, SIGTERM, kill and relaunch) are in tests/experiments/test_train_pod.py.
"""

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from oracles.helpers import REPO_ROOT

TIMEOUT = 300


def env(**extra):
  # Each child sets its own device count; drop anything inherited from the test process.
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)} | {"PYTHONUNBUFFERED": "1"} | extra


@contextlib.contextmanager
def processes(commands, envs):
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=envs[i], cwd=REPO_ROOT,
                            start_new_session=True) for i, c in enumerate(commands)]
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


class FakeMetadata(http.server.ThreadingHTTPServer):
  """The GCE metadata server of one TPU VM worker, as JAX's TPU cluster detection reads it."""

  def __init__(self, attributes):
    self.attributes = attributes
    super().__init__(("127.0.0.1", 0), FakeMetadataHandler)


class FakeMetadataHandler(http.server.BaseHTTPRequestHandler):
  PREFIX = "/computeMetadata/v1/instance/attributes/"

  def do_GET(self):  # noqa: N802 (http.server's name)
    key = self.path[len(self.PREFIX):] if self.path.startswith(self.PREFIX) else None
    value = self.server.attributes.get(key) if self.headers.get("Metadata-Flavor") == "Google" else None
    body = (value or "not found").encode()
    self.send_response(200 if value is not None else 404)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


TPU_WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    # JAX sets this when no TPU chip is on the PCI bus, and then skips the metadata server:
    # pretend this host has its chips (JAX_FORCE_TPU_INIT did the rest).
    os.environ.pop("TPU_SKIP_MDS_QUERY", None)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np
    from jax.experimental import multihost_utils
    from mos_jax import parallel

    assert "TPU_WORKER_HOSTNAMES" not in os.environ
    started = parallel.initialize()  # no arguments, as on every worker of a TPU slice
    # A pod's mesh follows the physical ring, interleaving processes: here p0, p1, p0, p1.
    devices = sorted(jax.devices(), key=lambda d: (d.id % 2, d.process_index))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=-1), devices=devices)
    sharding = parallel.batch_sharding(mesh)
    full = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    calls = []
    batch = parallel.global_batch(sharding, (8, 3), lambda a, b: (calls.append([a, b]), full[a:b])[1])
    gathered = multihost_utils.process_allgather(batch, tiled=True)
    print("RESULT " + json.dumps({
        "started": started, "index": jax.process_index(), "count": jax.process_count(),
        "calls": calls, "ranges": parallel.process_row_ranges(sharding, (8, 3)),
        "batch_ok": bool(np.array_equal(gathered, full))}), flush=True)
""")


@pytest.fixture(scope="module")
def tpu_workers():
  """Two processes that each see a TPU VM's metadata (worker 0 and 1 of a 2-host slice)."""
  endpoints = "127.0.0.1,127.0.0.1"  # JAX takes the first as the coordinator
  servers = [FakeMetadata({"agent-worker-number": str(i), "worker-network-endpoints": endpoints,
                           "tpu-env": "ACCELERATOR_TYPE: 'v4-16'\n"}) for i in range(2)]
  threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
  for t in threads:
    t.start()
  port = free_port()
  base = {k: v for k, v in env().items() if k not in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                                       "MOS_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS")}
  envs = [base | {"JAX_FORCE_TPU_INIT": "1", "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_PORT": str(port),
                  "GCE_METADATA_IP": f"127.0.0.1:{s.server_address[1]}"} for s in servers]
  try:
    with processes([[sys.executable, "-c", TPU_WORKER]] * 2, envs) as procs:
      outputs = finish(procs)
  finally:
    for s in servers:
      s.shutdown()
  return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out in outputs]


def test_initialize_reads_the_tpu_metadata_without_worker_hostnames(tpu_workers):
  assert [(r["started"], r["index"], r["count"]) for r in tpu_workers] == [(True, 0, 2), (True, 1, 2)]


def test_global_batch_with_processes_interleaved_on_the_mesh(tpu_workers):
  for r in tpu_workers:
    assert r["batch_ok"]
    assert len(r["ranges"]) == 2 and r["ranges"][0][1] != r["ranges"][1][0]  # not contiguous
    assert sorted(r["calls"]) == r["ranges"]  # each process loads only its own rows, once each
  assert sorted(rng for r in tpu_workers for rng in r["ranges"]) == [[0, 2], [2, 4], [4, 6], [6, 8]]
