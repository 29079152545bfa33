"""Preemption notices (SIGTERM) that every process acts on at the same step."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import jax
from jax.experimental import multihost_utils


@contextlib.contextmanager
def sigterm_flag(*, enabled: bool = True) -> Iterator[threading.Event]:
  """An event that SIGTERM sets while the block runs, instead of killing the process.

  The previous handler is back after the block. Signals can only be caught in
  the main thread: elsewhere (or with ``enabled=False``) the event never fires.

  Example:
    >>> with sigterm_flag() as stop:  # doctest: +SKIP
    ...   while not stop.is_set():
    ...     state = train_step(state)
  """
  flag = threading.Event()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def preemption_notice() -> Iterator[Callable[[int], bool]]:
  """Yields ``reached(step)``: whether to checkpoint and stop after ``step``, the same on every process.

  With ``jax.distributed`` running (every TPU slice, multi-process jobs), JAX's
  preemption service owns SIGTERM: a notice to any one process is shared
  through the coordinator, and every process is told to stop at the same step
  (one past the furthest step any process had reported). A Python SIGTERM
  handler would replace JAX's, leaving each host to stop on its own while the
  others wait in a collective, so none is installed. A single process without
  ``jax.distributed`` gets a SIGTERM handler that sets a flag while the block
  runs (the previous handler comes back after).

  JAX's rule: every process calls ``reached`` at every step, with the same
  increasing step numbers, starting from the same step. Call it once with the
  starting (restored) step before training, so that a notice that arrives
  during compilation still picks a step the loop will reach.

  Returns:
    A context manager yielding ``reached(step) -> bool``.

  Example:
    >>> with preemption_notice() as reached:  # doctest: +SKIP
    ...   reached(step)
    ...   while step < steps:
    ...     state = train_step(state); step += 1
    ...     if reached(step):
    ...       checkpointer.save(step, state, force=True); break
  """
  if jax.distributed.is_initialized():
    # Orbax's PreemptionCheckpointingPolicy asks the same question with the same step numbers.
    yield multihost_utils.reached_preemption_sync_point
    return
  with sigterm_flag() as flag:
    yield lambda step: flag.is_set()
