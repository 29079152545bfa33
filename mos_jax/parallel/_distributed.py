"""Multi-host set-up on JAX's own runtime: ``jax.distributed`` and per-process batches."""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

ENV_COORDINATOR = "MOS_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOS_NUM_PROCESSES"
ENV_PROCESS_ID = "MOS_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo") -> bool:
  """Starts ``jax.distributed`` from arguments, else ``MOS_*`` environment variables.

  On a TPU pod slice nothing needs to be given: with ``MOS_NUM_PROCESSES`` unset
  and TPU workers detected (``TPU_WORKER_HOSTNAMES``), JAX discovers the peers. A
  single process does nothing. Must run before any other JAX call.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: processes in the job.
    process_id: this process's index.
    cpu_collectives: collectives backend for CPU devices (``gloo``), used when
      processes run on CPUs (tests, loopback).

  Returns:
    Whether ``jax.distributed`` was initialised.

  Example:
    >>> initialize("10.0.0.2:1234", num_processes=2, process_id=0)  # doctest: +SKIP
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0") or 0)
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if num_processes > 1:
    if not coordinator_address or process_id is None:
      raise ValueError(f"{num_processes} processes need a coordinator address and a process id "
                       f"(--coordinator/--process-id or {ENV_COORDINATOR}/{ENV_PROCESS_ID}).")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
    jax.distributed.initialize()  # TPU pod: peers come from the TPU metadata
    return True
  return False


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """The contiguous range of leading-axis rows this process's devices hold.

  Raises:
    ValueError: the process's rows are not contiguous (a mesh whose device order
      interleaves processes along the batch axes).
  """
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
  if covered != stop - start:
    raise ValueError(f"Process {jax.process_index()} holds non-contiguous batch rows; build the mesh "
                     "from jax.devices() so each process's devices are adjacent.")
  return start, stop


def global_batch(sharding: NamedSharding, global_shape: tuple[int, ...],
                 load_rows: Callable[[int, int], np.ndarray]) -> jax.Array:
  """A global batch array assembled from each process's own rows.

  Each process calls ``load_rows(start, stop)`` for only the rows its devices hold,
  so no host reads the whole batch.

  Example:
    >>> batch = global_batch(batch_sharding(mesh), (64, 128), lambda a, b: tokens[a:b])  # doctest: +SKIP
  """
  start, stop = process_rows(sharding, global_shape)
  local = np.asarray(load_rows(start, stop))
  if local.shape != (stop - start, *global_shape[1:]):
    raise ValueError(f"load_rows({start}, {stop}) returned shape {local.shape}, expected "
                     f"{(stop - start, *global_shape[1:])}.")
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def is_main_process() -> bool:
  """Process 0 logs and writes single-writer files."""
  return jax.process_index() == 0
