"""Orbax checkpoints of a MoS training state, tied to the adapter's identity and checksummed."""

from __future__ import annotations

import hashlib
import logging
import operator
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from mos_jax._src.core.hashing import canonical_json, sha256_arrays
from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.identity import adapter_identity, as_json, differences, tree_layout
from mos_jax._src.core.targets import path_str
from mos_jax._src.errors import CorruptError, LockedError, MismatchError
from mos_jax._src.io.files import FileLock

#: Written into every checkpoint; bumped when the layout below changes. Format 2 adds
#: ``meta_sha256``, a checksum of the metadata itself; format 3 ``adapters``, the identity of every
#: Adapter in the state (found by type), checked on restore whatever identity the caller passed.
FORMAT = "mos_jax.train_checkpoint/3"
_FORMAT_2 = "mos_jax.train_checkpoint/2"
_LEGACY_FORMAT = "mos_jax.train_checkpoint/1"
#: Subfolder of the checkpoint directory that unreadable steps are moved into.
QUARANTINE = "corrupt"
#: The writer's lock file in the checkpoint directory (local folders).
LOCK = ".writer.lock"
_STATE, _META = "state", "meta"
_META_KEYS = ("format", "step", "identity", "layout", "key_impls", "sha256", "data_state", "adapters", "meta_sha256")
_MAX_REPORTED = 20

log = logging.getLogger(__name__)


class CheckpointLockedError(LockedError):
  """Another :class:`TrainCheckpointer` is writing to the same checkpoint directory."""


def _format_number(fmt: Any) -> int | None:
  """N of a ``mos_jax.train_checkpoint/N`` format string, ``None`` for anything else."""
  prefix = FORMAT.rsplit("/", 1)[0] + "/"
  if isinstance(fmt, str) and fmt.startswith(prefix) and fmt[len(prefix):].isdigit():
    return int(fmt[len(prefix):])
  return None


def _meta_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 of the metadata (all but its own ``meta_sha256``) as canonical JSON."""
  body = {k: v for k, v in meta.items() if k != "meta_sha256"}
  return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _checked_meta(step: int, meta: Any) -> dict[str, Any]:
  """The step's metadata if intact; ``CorruptError`` for any damage.

  Damage (a flipped bit, a renamed key, an edited ``data_state``) must lead to
  the previous step, not to "another run" or a silently different value.
  """
  if not isinstance(meta, dict):
    raise CorruptError(f"Step {step}: metadata is {type(meta).__name__}, not a JSON object.")
  if meta.get("format") == _LEGACY_FORMAT:
    warnings.warn(f"Checkpoint step {step} is format 1, whose metadata has no checksum; it is read as is.",
                  stacklevel=4)
    expected = set(_META_KEYS) - {"meta_sha256", "adapters"}
  elif meta.get("format") == _FORMAT_2:
    expected = set(_META_KEYS) - {"adapters"}
  elif meta.get("format") == FORMAT:
    expected = set(_META_KEYS)
  elif (_format_number(meta.get("format")) or 0) > _format_number(FORMAT) and \
      meta.get("meta_sha256") == _meta_digest(meta):
    # Every format from 2 on checksums its metadata this way, so an intact newer step is told apart
    # from damage (a flipped "2" -> "3" fails the checksum): it is refused, never set aside as corrupt.
    raise MismatchError(
        f"Checkpoint step {step} was written by a newer mos_jax (format {meta['format']!r}; this version reads up to "
        f"{FORMAT!r}). Upgrade mos_jax to resume it. It was left in place; a run of this version must not write "
        "into this directory.")
  else:
    raise CorruptError(f"Step {step}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}.")
  if set(meta) != expected:
    raise CorruptError(f"Step {step}: metadata keys {sorted(set(meta) ^ expected)} are missing or "
                                 "unexpected: the metadata file is damaged.")
  if "meta_sha256" in meta and _meta_digest(meta) != meta["meta_sha256"]:
    raise CorruptError(f"Step {step}: the metadata differs from what was saved (checksum "
                                 "mismatch): the file was altered or damaged.")
  if meta["step"] != step:
    raise CorruptError(f"Step {step}: its metadata says step {meta['step']!r}.")
  return meta


def adapters_identity(tree: Any) -> dict[str, Any]:
  """``{tree path: adapter_identity}`` of every :class:`~mos_jax.Adapter` in a pytree, found by type.

  The path is the adapter's "/"-joined key path in the tree (``"(root)"`` for the tree itself).
  """
  found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Adapter))[0]
  return {path_str(p) or "(root)": adapter_identity(x) for p, x in found if isinstance(x, Adapter)}


def _writer_lock(directory: Path) -> FileLock:
  """The exclusive lock on ``<directory>/.writer.lock`` (released on close or process death)."""
  directory.mkdir(parents=True, exist_ok=True)
  return FileLock(directory / LOCK, what=f"Checkpoint directory {directory}", error=CheckpointLockedError,
                  fix="Two TrainCheckpointers would delete each other's steps. Stop that process (or close() it), "
                      "use another directory, or pass read_only=True to only restore.")


class Restored(NamedTuple):
  """What :meth:`TrainCheckpointer.restore` returns.

  Attributes:
    step: the step the state was saved at.
    state: the restored pytree, laid out like the ``like`` argument.
    data_state: the JSON value saved with it (e.g. the data iterator's position).
  """

  step: int
  state: Any
  data_state: Any


def _as_step(step: Any) -> int:
  """A step as a Python ``int`` (NumPy and JAX integer scalars too, which JSON cannot write)."""
  try:
    if isinstance(step, (bool, np.bool_)):
      raise TypeError
    return operator.index(step)
  except TypeError:
    raise TypeError(f"A checkpoint step must be an integer, got {step!r} ({type(step).__name__}).") from None


def _short(e: BaseException, limit: int = 300) -> str:
  # TensorStore errors embed whole JSON specs; the head says what failed.
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _unwrap_keys(tree: Any) -> Any:
  # Orbax stores plain arrays; typed PRNG keys travel as their uint32 key data.
  return jax.tree_util.tree_map(
      lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _digest(plain: Any) -> str | None:
  """SHA-256 of every leaf's path, dtype, shape and bytes; catches silently garbled files."""
  if jax.process_count() > 1:
    return None  # arrays are not fully addressable here; rely on Orbax's own read errors
  return sha256_arrays((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(plain)[0])


def _abstract(like: Any) -> Any:
  """Target shapes, dtypes and shardings for Orbax; key leaves as their key data."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def one(x):
    sharding = getattr(x, "sharding", None) or default
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree_util.tree_map(one, like)


def _key_impls(tree: Any) -> dict[str, str]:
  """``{leaf path: PRNG implementation name}`` of the typed-key leaves."""
  return {path_str(p): str(jax.random.key_impl(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)}


def _rewrap_keys(plain: Any, impls: Mapping[str, str]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.wrap_key_data(x, impl=impls[path_str(p)]) if path_str(p) in impls else x, plain)


class TrainCheckpointer:
  """Saves and restores a training state with Orbax, refusing foreign checkpoints.

  Each step is an Orbax composite of the state pytree (``StandardSave``: pools,
  optimizer state, step counters, PRNG keys, anything) and a JSON item holding
  the ``identity``, the state's layout, its adapters' identities, a SHA-256 of its values and a free JSON
  ``data_state`` (the data iterator's position). Orbax writes a step into a
  temporary folder and renames it when complete, so a crash mid-save leaves no
  step that :meth:`all_steps` reports. Restoring without a step takes the newest
  readable one: steps that fail to read or whose checksum differs are moved to
  ``<directory>/corrupt/`` (once an older step has restored) with a warning.

  Args:
    directory: the checkpoint folder (created if missing).
    identity: JSON dict that a checkpoint must match to be restored, e.g.
      ``{"train": {...}, "base_model": mos_jax.train.tree_layout(params)}``. The
      adapters need no entry: every :class:`~mos_jax.Adapter` in a saved state
      (found by type, anywhere in the tree) has its :func:`adapter_identity`
      (config, seed included, spec digest, groups) recorded, and restoring into
      an adapter whose identity differs is refused with the differences, whatever
      ``identity`` says.
    save_every: :meth:`save` writes only at multiples of this (unless forced).
    keep: how many most recent steps to keep; ``None`` keeps all.
    async_save: write in a background thread; :meth:`save` returns once the
      arrays are copied off the device.
    read_only: only restore: takes no lock, never saves, deletes nothing (for
      evaluating a run's checkpoints while it trains).

  One writer per directory: a writer takes an exclusive lock on
  ``<directory>/.writer.lock`` (local folders; on multi-host runs the primary
  process takes it) and a second writer gets a :class:`CheckpointLockedError`
  naming the holder. The kernel drops the lock when the holder exits or crashes.
  Object stores (``gs://``) have no such lock: there, run one job per directory.

  Example:
    >>> ckpt = TrainCheckpointer("run/ckpt", identity={"adapter": adapter_identity(adapter)},
    ...                          save_every=100, keep=3)  # doctest: +SKIP
    >>> ckpt.save(step, {"pools": pools, "opt_state": opt_state}, data_state={"position": step})  # doctest: +SKIP
    >>> step, state, data = ckpt.restore({"pools": pools, "opt_state": opt_state})  # doctest: +SKIP
  """

  def __init__(self, directory: str | Path, *, identity: Mapping[str, Any], save_every: int = 1,
               keep: int | None = 3, async_save: bool = True, read_only: bool = False):
    if save_every < 1 or (keep is not None and keep < 1):
      raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1 (keep may be None).")
    # epath: local folders and gs:// buckets (pods checkpoint to shared storage) alike.
    path = epath.Path(directory)
    # epath's absolute() prefixes the working directory to URLs (gs://b/x -> <cwd>/gs:/b/x).
    self.directory = path if "://" in str(directory) else path.absolute()
    self._identity = as_json(dict(identity))
    self.read_only = read_only
    self._lock = None
    # Taken before Orbax looks at the folder: its start-up cleanup of unfinished saves would
    # delete a running writer's in-progress step.
    if not read_only and jax.process_index() == 0 and str(self.directory).startswith("/"):
      self._lock = _writer_lock(Path(str(self.directory)))
    policies = ocp.checkpoint_managers
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          # Multiples of save_every, plus JAX's multi-host preemption notice; unlike Orbax's
          # default, no extra save of whatever step comes first.
          save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                                       policies.PreemptionCheckpointingPolicy()]),
          max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
          read_only=read_only,
          # Folders of saves that crashed before their commit rename are never steps; drop them.
          cleanup_tmp_directories=not read_only))
    except BaseException:
      self._release()
      raise

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def all_steps(self) -> list[int]:
    """Complete (committed) steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step, or ``None``."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is due (a multiple of ``save_every`` past the latest step)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
    """Starts saving ``state`` as ``step`` if ``step`` is due (or ``force``).

    Args:
      step: the training step the state is after.
      state: any pytree of arrays (typed PRNG keys allowed).
      data_state: JSON-serialisable value restored alongside (the data position).
      force: save even if ``step`` is not a multiple of ``save_every``.

    Returns:
      Whether a save was started; call :meth:`wait` to block until it is committed.

    Raises:
      TypeError: ``step`` is not an integer (NumPy integers are converted).
      CheckpointLockedError: the directory's lock file was deleted or replaced
        since this writer took it (another writer may be in).
    """
    if self.read_only:
      raise RuntimeError(f"TrainCheckpointer({self.directory}) is read_only: it cannot save.")
    step = _as_step(step)
    if self._lock is not None:
      self._lock.check()
    if not force and not self._manager.should_save(step):
      return False
    try:
      data_state = as_json(data_state)
    except TypeError as e:
      raise TypeError(f"data_state must be JSON-serialisable (ints, floats, str, lists, dicts): {e}") from e
    plain = _unwrap_keys(state)
    meta = {"format": FORMAT, "step": step, "identity": self._identity, "layout": tree_layout(state),
            "adapters": adapters_identity(state),
            "key_impls": _key_impls(state), "sha256": _digest(plain), "data_state": data_state}
    # The metadata is checksummed too: damage to it must read as damage, not as another run.
    meta["meta_sha256"] = _meta_digest(meta)
    return self._manager.save(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(plain), _META: ocp.args.JsonSave(meta)}), force=force)

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def restore(self, like: Any, *, step: int | None = None) -> Restored:
    """Restores a step onto the shapes, dtypes and shardings of ``like``.

    ``like``'s leaves (arrays or ``jax.ShapeDtypeStruct``) give each restored
    array its sharding, so a state saved on one mesh restores onto another.

    Args:
      like: a pytree with the structure of the saved state.
      step: the step to restore; ``None`` takes the newest readable step.

    Returns:
      ``Restored(step, state, data_state)``.

    Raises:
      FileNotFoundError: no complete checkpoint (or not ``step``) exists.
      MismatchError: the checkpoint belongs to another model, adapter
        or state layout; the message lists every difference.
        Also raised, saying "written by a newer mos_jax", when the newest step
        has a newer metadata format: it is left in place, never taken for damage.
      CorruptError: the requested step, or every step, is unreadable.
    """
    self.wait()
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"No complete checkpoint of step {step} in {self.directory}; "
                                f"complete steps: {steps}.")
      return self._restore_step(step, like)
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    failed: list[tuple[int, Exception]] = []
    for s in reversed(steps):
      try:
        restored = self._restore_step(s, like)
      except CorruptError as e:
        log.warning("Checkpoint step %d in %s is unreadable (%s); trying the previous one.", s, self.directory, e)
        failed.append((s, e))
        continue
      # An older step restored with the same `like`, so the newer failures are the files' fault.
      for bad, _ in failed:
        self._quarantine(bad)
      return restored
    detail = "; ".join(str(e) for _, e in failed)
    raise CorruptError(f"No checkpoint in {self.directory} could be restored ({detail}).") \
        from failed[0][1]

  def _restore_step(self, step: int, like: Any) -> Restored:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:  # Orbax and TensorStore raise assorted types for unreadable files.
      raise CorruptError(f"Step {step}: its metadata cannot be read ({_short(e)}).") from e
    meta = _checked_meta(step, meta)
    live = adapters_identity(like)
    if "adapters" not in meta and live:
      warnings.warn(f"Checkpoint step {step} is format {meta['format'][-1]}, which does not record the adapters in its "
                    "state: only the identity passed to TrainCheckpointer ties it to them.", stacklevel=3)
    # The adapters first: a config, routing or model difference says more than the layout lines it causes.
    diffs = (differences({"adapters": meta["adapters"]}, {"adapters": live}) if "adapters" in meta else []) + \
        differences(meta["identity"], self._identity) + \
        differences({"state": meta["layout"]}, {"state": tree_layout(like)})
    if diffs:
      shown = "\n  - ".join(diffs[:_MAX_REPORTED])
      more = f"\n  ... and {len(diffs) - _MAX_REPORTED} more" if len(diffs) > _MAX_REPORTED else ""
      raise MismatchError(
          f"Checkpoint {self.directory}/{step} does not belong to this run:\n  - {shown}{more}\n"
          "Restore with the same model, MoSConfig (seed included) and training state, or use "
          "another checkpoint directory.")
    try:
      plain = self._manager.restore(step, args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(_abstract(like))}))[_STATE]
    except Exception as e:  # as above
      raise CorruptError(f"Step {step}: its arrays cannot be read ({_short(e)}).") from e
    if meta["sha256"] is not None and _digest(plain) != meta["sha256"]:
      raise CorruptError(f"Step {step}: the arrays read back differ from those saved "
                                   "(checksum mismatch): the files were altered or damaged.")
    return Restored(step, _rewrap_keys(plain, meta["key_impls"]), meta["data_state"])

  def _quarantine(self, step: int) -> None:
    if self.read_only:  # a reader changes nothing; the writer sets the step aside when it restores
      log.warning("Checkpoint step %d in %s is unreadable; left in place (read_only).", step, self.directory)
      return
    # Every process found the same damage; only the primary one moves the folder (a second
    # rename of the same folder would fail), and all wait for it before re-listing the steps.
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / QUARANTINE / f"{step}-{time.time_ns()}"
      dst.parent.mkdir(exist_ok=True)
      src.rename(dst)
      log.warning("Moved unreadable checkpoint step %d to %s.", step, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mos_jax_quarantine_{step}")
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending saves, releases Orbax's threads and the directory's writer lock."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    finally:
      self._release()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
