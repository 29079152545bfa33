"""Multi-host set-up on JAX's own runtime: ``jax.distributed`` and per-process batches."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

ENV_COORDINATOR = "MOS_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOS_NUM_PROCESSES"
ENV_PROCESS_ID = "MOS_PROCESS_ID"

#: PCI ids of Cloud TPU chips (Google's vendor id; v3, v4, v5p, v5e, v6e, 7x and an unnamed one),
#: the table JAX 0.10.2 checks before it turns to the TPU metadata (``jax._src.hardware_utils``).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def tpu_chip_count(pci_devices: str | os.PathLike = "/sys/bus/pci/devices") -> int:
  """How many Cloud TPU chips are attached to this host (0 off a TPU VM).

  Reads PCI vendor and device ids, as JAX does, so it starts no backend.

  Args:
    pci_devices: the sysfs folder of PCI devices (a fake one in tests).

  Returns:
    The number of TPU chips on this host.

  Example:
    >>> tpu_chip_count() >= 0
    True
  """
  count = 0
  for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
    device = Path(vendor).with_name("device")
    try:
      if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and device.read_text().strip() in _TPU_PCI_DEVICES:
        count += 1
    except OSError:  # a device that disappears or cannot be read is no TPU we can use
      continue
  return count


def on_cloud_tpu() -> bool:
  """Whether this host is a Cloud TPU VM: TPU chips attached, or ``JAX_FORCE_TPU_INIT`` set (JAX's override)."""
  return "JAX_FORCE_TPU_INIT" in os.environ or tpu_chip_count() > 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cloud_tpu: bool | None = None, cpu_collectives: str = "gloo",
               initialization_timeout: int = 300) -> bool:
  """Starts ``jax.distributed`` when this is one process of several; call it before any other JAX call.

  The first case that applies:

  * ``num_processes > 1`` (argument or ``MOS_NUM_PROCESSES``): the given
    coordinator and process id (several GPU hosts, CPU processes on loopback).
  * a Cloud TPU VM (``cloud_tpu``, default :func:`on_cloud_tpu`):
    ``jax.distributed.initialize()`` without arguments. JAX reads the slice
    from the TPU metadata server (``agent-worker-number``,
    ``worker-network-endpoints`` on TPU VMs; ``TPU_WORKER_HOSTNAMES`` on GKE).
    A single-host slice (v4-8) is initialised too, as MaxText does: Orbax's
    asynchronous saves and JAX's preemption sync point need the distributed
    runtime.
  * anything else (including ``num_processes=1``): one process, nothing to do.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: processes in the job.
    process_id: this process's index.
    cloud_tpu: force the TPU case on or off; ``None`` detects it.
    cpu_collectives: collectives backend for CPU devices (``gloo``), used when
      processes run on CPUs (tests, loopback).
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    Whether ``jax.distributed`` is running (started here, or earlier).

  Raises:
    ValueError: several processes without a coordinator address or process id.

  Example:
    >>> initialize("10.0.0.2:1234", num_processes=2, process_id=0)  # doctest: +SKIP
    >>> initialize()  # on every worker of a TPU slice  # doctest: +SKIP
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if num_processes is not None and num_processes > 1:
    if not coordinator_address or process_id is None:
      raise ValueError(f"{num_processes} processes need a coordinator address and a process id "
                       f"(--coordinator/--process-id or {ENV_COORDINATOR}/{ENV_PROCESS_ID}).")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout)
    return True
  if num_processes is None and (on_cloud_tpu() if cloud_tpu is None else cloud_tpu):
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return True
  return False


def process_row_ranges(sharding: NamedSharding, global_shape: tuple[int, ...],
                       process_index: int | None = None) -> list[tuple[int, int]]:
  """The distinct ``(start, stop)`` leading-axis row ranges a process's devices hold, sorted.

  On a TPU pod the mesh follows the chips' physical ring, so one host's rows are
  usually not contiguous (on a v4-32, host 0 holds rows 0, 4, 8, 12 of 16).

  Args:
    sharding: the batch sharding.
    global_shape: the global batch shape.
    process_index: the process (default: this one).

  Returns:
    The row ranges, each once (replicas along other mesh axes share one).
  """
  process_index = jax.process_index() if process_index is None else process_index
  ranges = set()
  for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
    if device.process_index == process_index:
      rows = index[0] if index else slice(None)
      ranges.add((rows.start or 0, global_shape[0] if rows.stop is None else rows.stop))
  return sorted(ranges)


def global_batch(sharding: NamedSharding, global_shape: tuple[int, ...],
                 load_rows: Callable[[int, int], np.ndarray]) -> jax.Array:
  """A global batch array assembled from each process's own rows, whatever the device order.

  Each process calls ``load_rows(start, stop)`` once for each row range its
  devices hold (:func:`process_row_ranges`), so no host reads the whole batch
  and the rows need not be contiguous.

  Args:
    sharding: where the batch goes (rows split over the batch mesh axes).
    global_shape: the global batch shape.
    load_rows: ``load_rows(start, stop)`` returns rows ``start:stop`` of the
      global batch, shape ``(stop - start, *global_shape[1:])``.

  Returns:
    The global ``jax.Array``.

  Raises:
    ValueError: ``load_rows`` returned the wrong shape.

  Example:
    >>> batch = global_batch(batch_sharding(mesh), (64, 128), lambda a, b: tokens[a:b])  # doctest: +SKIP
  """
  global_shape = tuple(global_shape)
  cache: dict[tuple[int, int], np.ndarray] = {}

  def rows(start: int, stop: int) -> np.ndarray:
    if (start, stop) not in cache:
      local = np.asarray(load_rows(start, stop))
      if local.shape != (stop - start, *global_shape[1:]):
        raise ValueError(f"load_rows({start}, {stop}) returned shape {local.shape}, expected "
                         f"{(stop - start, *global_shape[1:])}.")
      cache[(start, stop)] = local
    return cache[(start, stop)]

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    first = index[0] if index else slice(None)
    start, stop = first.start or 0, global_shape[0] if first.stop is None else first.stop
    return rows(start, stop)[(slice(None), *index[1:])]

  return jax.make_array_from_callback(global_shape, sharding, shard)


def is_main_process() -> bool:
  """Process 0 logs and writes single-writer files."""
  return jax.process_index() == 0
