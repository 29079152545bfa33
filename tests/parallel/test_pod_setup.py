"""Multi-host set-up without a pod: fake TPU devices with a pod's coords and hosts, a fake PCI bus,
and the choices `parallel.initialize` and `parallel.preemption_notice` make (in-process, fast)."""

import dataclasses
import os
import signal

import jax
import pytest

from mos_jax import parallel
from mos_jax.parallel import MeshConfig


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What `jax.make_mesh` reads of a TPU device to order a mesh along the physical torus."""

  id: int
  process_index: int
  coords: tuple
  device_kind: str
  core_on_chip: int = 0
  platform: str = "tpu"
  slice_index: int = 0


def pod(kind, grid, host):
  """Chips on a ``grid`` torus (x, y, z), each host owning a ``host`` (x, y) block, as on Cloud TPU."""
  xs, ys, zs = grid
  devices = []
  for z in range(zs):
    for y in range(ys):
      for x in range(xs):
        process = (z * (ys // host[1]) + y // host[1]) * (xs // host[0]) + x // host[0]
        devices.append(FakeTpu(len(devices), process, (x, y, z), kind))
  return devices


PODS = {"v4-32": ("TPU v4", (2, 2, 4), (2, 2)),  # 16 chips, 4 hosts of 2x2x1
        "v5litepod-16": ("TPU v5 lite", (4, 4, 1), (2, 2))}  # 16 chips, 4 hosts of 2x2


@pytest.mark.parametrize("name", PODS)
def test_pod_batches_need_no_contiguous_rows(name):
  """`make_mesh` follows the torus, so hosts interleave; each host still gets exactly its rows."""
  devices = pod(*PODS[name])
  mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=-1), devices=devices)
  sharding = parallel.batch_sharding(mesh)
  shape = (32, 8)
  ranges = {p: parallel.process_row_ranges(sharding, shape, p) for p in range(4)}
  # The old contiguous-rows assumption fails on these pods (so the first batch would have crashed).
  assert any(r[i][1] != r[i + 1][0] for r in ranges.values() for i in range(len(r) - 1))
  rows = sorted(row for r in ranges.values() for a, b in r for row in range(a, b))
  assert rows == list(range(shape[0]))  # every row on exactly one host
  by_device = sharding.devices_indices_map(shape)
  for p, r in ranges.items():
    mine = {(idx[0].start, idx[0].stop) for d, idx in by_device.items() if d.process_index == p}
    assert set(r) == mine


def test_replicas_along_tensor_share_one_row_range():
  devices = pod(*PODS["v4-32"])
  mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2), devices=devices)
  ranges = [parallel.process_row_ranges(parallel.batch_sharding(mesh), (16, 4), p) for p in range(4)]
  assert sum(len(r) for r in ranges) == 8 and len({x for r in ranges for x in r}) == 8


def test_tpu_chip_count_reads_the_pci_ids(tmp_path):
  devices = {"0000:00:04.0": ("0x1ae0", "0x005e"), "0000:00:05.0": ("0x1ae0", "0x005e"),  # two v4 chips
             "0000:00:06.0": ("0x1ae0", "0x0042"),  # Google's gVNIC: not a TPU
             "0000:00:07.0": ("0x10de", "0x2330")}  # an NVIDIA GPU
  for name, (vendor, device) in devices.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
    (tmp_path / name / "device").write_text(device + "\n")
  assert parallel.tpu_chip_count(tmp_path) == 2
  assert parallel.tpu_chip_count(tmp_path / "missing") == 0


@pytest.fixture
def recorded(monkeypatch):
  """`jax.distributed.initialize` replaced by a recorder (the real one can run once per process)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID, "JAX_FORCE_TPU_INIT"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_on_a_tpu_vm_lets_jax_read_the_slice(recorded, monkeypatch):
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert parallel.initialize(cloud_tpu=True) is True
  assert recorded == [((), {"initialization_timeout": 300})]  # no coordinator: JAX asks the metadata server


def test_initialize_elsewhere(recorded, monkeypatch):
  assert parallel.initialize(cloud_tpu=False) is False
  assert parallel.initialize(num_processes=1, cloud_tpu=True) is False  # explicitly one process
  assert not recorded
  monkeypatch.setenv("JAX_FORCE_TPU_INIT", "1")  # JAX's own "this is a TPU VM" override
  assert parallel.on_cloud_tpu() and parallel.initialize() is True
  with pytest.raises(ValueError, match="coordinator address and a process id"):
    parallel.initialize(num_processes=2)


def test_preemption_notice_in_one_process_is_a_sigterm_flag():
  before = signal.getsignal(signal.SIGTERM)
  with parallel.preemption_notice() as reached:
    assert not reached(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert reached(1) and reached(2)
  assert signal.getsignal(signal.SIGTERM) == before
