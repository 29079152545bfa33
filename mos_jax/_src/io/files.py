"""File I/O: atomic writes that never leave a half file, recovery from killed writers, folder manifests."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Callable, Collection, Iterator

from mos_jax._src.errors import CorruptError, LockedError


#: The file an export folder's checksums live in (``write_manifest``/``verify_manifest``).
MANIFEST = "mos_jax_manifest.json"
MANIFEST_FORMAT = "mos_jax.manifest/1"

log = logging.getLogger(__name__)


def _tag() -> str:
  # Who wrote a temp file: a leftover is removed only once its writer is known to be dead.
  return f"{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _leftovers(path: Path) -> list[tuple[str, Path]]:
  """``(kind, entry)`` for each temp entry of ``path`` whose writer (this host) is dead."""
  out = []
  if not path.parent.is_dir():
    return out
  host = socket.gethostname()
  for entry in path.parent.iterdir():
    for kind in ("tmp", "old"):
      prefix = f".{path.name}.{kind}-"
      if not entry.name.startswith(prefix):
        continue
      parts = entry.name[len(prefix):].rsplit("-", 2)
      if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
        out.append((kind, entry))
  return out


def _remove(entry: Path) -> None:
  if entry.is_dir() and not entry.is_symlink():
    shutil.rmtree(entry, ignore_errors=True)
  else:
    entry.unlink(missing_ok=True)


def recover(path: Path) -> None:
  """Restores or removes what a killed :func:`atomic_file`/:func:`atomic_dir` left next to ``path``.

  A writer killed between moving the previous folder aside and moving the new
  one in leaves no ``path`` but a ``.<name>.old-*`` folder: it is moved back,
  so the previous version is never lost. Temp files and folders of dead
  writers (same host, process gone) are removed; those of live writers (or of
  other hosts) are left alone. Called by every atomic write, and by loaders.

  Args:
    path: the final file or folder.
  """
  found = _leftovers(path)
  olds = sorted((e for kind, e in found if kind == "old"), key=lambda e: e.stat().st_mtime)
  if olds and not os.path.lexists(path):
    os.replace(olds.pop(), path)  # the newest previous version
    log.warning("Restored %s from an interrupted replace.", path)
  for entry in olds + [e for kind, e in found if kind == "tmp"]:
    _remove(entry)


def _temp_name(path: Path, kind: str) -> Path:
  """A fresh ``.<name>.<kind>-<host>-<pid>-<random>`` next to ``path`` (the form :func:`recover` reads)."""
  return path.parent / f".{path.name}.{kind}-{_tag()}{secrets.token_hex(4)}"


def _new_dir(path: Path, kind: str) -> Path:
  """Creates a temp folder next to ``path`` with the umask's permissions (``mkdtemp`` would make it 0700)."""
  while True:
    tmp = _temp_name(path, kind)
    try:
      os.mkdir(tmp, 0o777)  # the umask applies, as for any folder the user makes
      return tmp
    except FileExistsError:
      continue


def _new_file(path: Path) -> Path:
  """Creates an empty temp file next to ``path`` with the umask's permissions (``mkstemp`` would make it 0600)."""
  while True:
    tmp = _temp_name(path, "tmp")
    try:
      os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
      return tmp
    except FileExistsError:
      continue


class FileLock:
  """An exclusive, non-blocking ``flock`` on a lock file, whose identity is checked while it is held.

  The file records the holder (host, pid, start time) for the error message; the lock is the
  kernel's, so a killed holder never leaves a stale lock. The file stays when released (removing
  it would let two writers lock two different files of one name). Deleting or replacing it while
  it is held would let a second writer in: :meth:`check` (called before every write it guards)
  then raises instead of writing.

  Args:
    path: the lock file (created if missing).
    what: what it guards, for messages (``"Export folder out/peft"``).
    fix: what to do when it is held elsewhere.
    error: the exception type raised (a :class:`~mos_jax.errors.LockedError`).

  Raises:
    LockedError: another process holds the lock.
  """

  def __init__(self, path: Path, *, what: str, fix: str, error: type[LockedError] = LockedError):
    self.path, self.what, self.error = Path(path), what, error
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
      os.close(self._fd)
      self._fd = None
      raise error(f"{what} is already being written by another process ({holder}). {fix}") from None
    self._id = self._identity(os.fstat(self._fd))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:  # only for the message: a full disk must not stop the write it guards (that one reports it)
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {stamp}".encode(), 0)
    except OSError:
      pass

  @staticmethod
  def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino

  def check(self) -> None:
    """Raises the lock's error if its file was deleted or replaced since it was taken."""
    try:
      same = self._identity(os.stat(self.path)) == self._id
    except FileNotFoundError:
      same = False
    if not same:
      raise self.error(
          f"{self.what}: its lock file {self.path} was deleted or replaced while this process held it, so "
          "another writer may now hold a new one; nothing more is written from here. Make sure only one "
          "process writes it (never delete a lock file of a running writer), then write again.")

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None


def lock_name(path: Path) -> Path:
  """The lock file guarding writes of ``path``: ``.<name>.lock`` beside it (an export folder is replaced whole)."""
  path = Path(path)
  return path.parent / f".{path.name}.lock"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _full_disk(e: BaseException, path: Path) -> OSError | None:
  """For a full disk (an ``OSError``, or a writer library's error wrapping one), an ``OSError``
  saying what was kept and what to do; ``None`` for any other error."""
  if isinstance(e, OSError) and e.errno in _FULL:
    code = e.errno
  elif not isinstance(e, OSError) and "No space left on device" in str(e):  # e.g. safetensors' own error
    code = errno.ENOSPC
  else:
    return None
  return OSError(code, f"{os.strerror(code)} while writing {path}; nothing was replaced (any previous "
                       f"{path.name} is intact) and the partial write was removed. Free space and retry.")


def atomic_file(path: Path, write: Callable[[str], None]) -> None:
  """Writes through a temp file in the same folder, then renames: never a half file.

  The temp file is named after the writer (host, pid), so leftovers of a
  killed writer are removed by the next write of the same file.

  Args:
    path: the final file.
    write: ``write(tmp_path)`` fills the temp file.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  recover(path)
  tmp = _new_file(path)
  mode = stat.S_IMODE(os.stat(tmp).st_mode)  # the umask's: writers that make their own temp file may narrow it
  try:
    write(tmp)
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)
  except BaseException as e:
    os.unlink(tmp)
    full = _full_disk(e, path)
    if full is not None:
      raise full from e
    raise


@contextlib.contextmanager
def atomic_dir(folder: Path) -> Iterator[Path]:
  """Yields a temp folder that replaces ``folder`` only once the block succeeds.

  The replace is two renames (the old folder aside, the new one in); a crash
  between them is repaired by :func:`recover`, which the next write (or a
  loader) runs: the previous folder comes back, so there is always a complete
  export at ``folder`` once one was written. One writer at a time: the block
  holds a :class:`FileLock` on ``.<name>.lock`` beside the folder, so a second
  process writing the same folder gets a ``LockedError`` naming the first
  instead of racing it. Folders are created with the umask's permissions.

  Raises:
    LockedError: another process is writing ``folder``, or the lock file was
      deleted while this block held it.

  Example:
    >>> with atomic_dir(Path("out/peft")) as tmp:  # doctest: +SKIP
    ...   (tmp / "adapter_config.json").write_text("{}")
  """
  folder = Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  lock = FileLock(lock_name(folder), what=f"Export folder {folder}",
                  fix="Two writers of one folder would replace each other's files: wait for that one to finish, "
                      "or write to another folder.")
  try:
    recover(folder)
    tmp = _new_dir(folder, "tmp")
    try:
      yield tmp
      lock.check()
    except BaseException as e:
      shutil.rmtree(tmp)
      full = _full_disk(e, folder)
      if full is not None:
        raise full from e
      raise
    if folder.exists():
      old = _new_dir(folder, "old")
      os.replace(folder, old)  # a rename onto an empty folder
      os.replace(tmp, folder)
      shutil.rmtree(old)
    else:
      os.replace(tmp, folder)
  finally:
    lock.release()


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(folder: Path) -> Path:
  """Records the size and SHA-256 of every file in ``folder`` (recursively) in ``folder/MANIFEST``.

  Tools that load the folder (PEFT, transformers) ignore the extra file; ours
  verify against it. Call it last, inside :func:`atomic_dir`.
  """
  folder = Path(folder)
  files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _file_sha256(p)}
           for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
  (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True))
  return folder / MANIFEST


def _read_tree(dfd: int, keep: Collection[str]) -> tuple[dict[str, tuple[int, str]], dict[str, bytes]]:
  """``({relative path: (bytes, sha256)}, {name: content for names in keep})`` of the folder open as ``dfd``."""
  files, kept = {}, {}
  for dirpath, _, filenames, dirfd in os.fwalk(".", dir_fd=dfd):
    for filename in filenames:
      rel = os.path.normpath(os.path.join(dirpath, filename))
      fd = os.open(filename, os.O_RDONLY, dir_fd=dirfd)
      with os.fdopen(fd, "rb") as f:
        h, size, chunks = hashlib.sha256(), 0, []
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
          size += len(chunk)
          if rel in keep or rel == MANIFEST:
            chunks.append(chunk)
      files[rel] = (size, h.hexdigest())
      if rel in keep or rel == MANIFEST:
        kept[rel] = b"".join(chunks)
  return files, kept


def _still_there(folder: Path, dfd: int) -> bool:
  """Whether ``folder`` still names the folder open as ``dfd`` (not replaced since it was opened)."""
  try:
    now, then = os.stat(folder), os.fstat(dfd)
  except FileNotFoundError:
    return False
  return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)


def _being_replaced(folder: Path) -> bool:
  """Whether a writer's temp or previous folder sits beside ``folder`` (a replace in progress)."""
  prefixes = (f".{folder.name}.tmp-", f".{folder.name}.old-")
  return folder.parent.is_dir() and any(e.name.startswith(prefixes) for e in folder.parent.iterdir())


def _check_manifest(folder: Path, files: dict[str, tuple[int, str]], raw: bytes | None) -> bool:
  if raw is None:
    return False
  try:
    stored = json.loads(raw)
    if stored.get("format") != MANIFEST_FORMAT:
      raise ValueError(f"format {stored.get('format')!r}")
    listed = dict(stored["files"])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CorruptError(f"{folder / MANIFEST} is damaged ({e}).") from e
  present = set(files) - {MANIFEST}
  problems = [f"{name}: missing" for name in sorted(set(listed) - present)]
  problems += [f"{name}: not in the manifest" for name in sorted(present - set(listed))]
  for name in sorted(set(listed) & present):
    size, digest = files[name]
    if size != listed[name].get("bytes"):
      problems.append(f"{name}: {size} bytes, {listed[name].get('bytes')} written")
    elif digest != listed[name].get("sha256"):
      problems.append(f"{name}: content differs (checksum mismatch)")
  if problems:
    raise CorruptError(f"{folder} differs from what was written: " + "; ".join(problems) +
                       ". Export it again.")
  return True


def read_verified(folder: Path, keep: Collection[str] = (), *, timeout: float = 10.0) -> tuple[bool, dict[str, bytes]]:
  """Reads a folder as one snapshot and checks it against its manifest.

  The folder is opened once and every file read through that handle, so a
  writer replacing the folder meanwhile (:func:`atomic_dir`) cannot mix two
  exports into one read: if the folder was replaced while it was read, or is
  missing mid-replace, the read starts again (up to ``timeout`` seconds). Only
  a folder that stayed in place while it was read is judged.

  Args:
    folder: the folder.
    keep: relative paths whose content to return.
    timeout: how long to keep retrying while writers replace the folder.

  Returns:
    ``(has_manifest, {path: content})``; ``has_manifest`` is ``False`` for a
    folder written by another tool (nothing to check against).

  Raises:
    FileNotFoundError: no such folder (and no replace in progress).
    CorruptError: a file is missing, extra, or differs in size or content, or
      the manifest itself is unreadable.
  """
  folder = Path(folder)
  deadline, pause, missing_since = time.monotonic() + timeout, 0.001, None
  while True:
    try:
      dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
      dfd = None
      # Missing between a writer's two renames (microseconds), or for good: a folder no mos_jax writer ever
      # replaced (no lock file beside it) is missing for good at once, another once no replace shows for 0.2 s.
      if _being_replaced(folder):
        missing_since = None
      else:
        missing_since = missing_since or time.monotonic()
        if not lock_name(folder).exists() or time.monotonic() - missing_since > 0.2:
          raise FileNotFoundError(errno.ENOENT, "No such export folder", str(folder)) from None
    except NotADirectoryError:
      raise NotADirectoryError(errno.ENOTDIR, "Not a folder (an export is a folder)", str(folder)) from None
    if dfd is not None:
      try:
        try:
          files, kept = _read_tree(dfd, keep)
        except FileNotFoundError:  # a file went while it was listed: the folder is being removed
          files = None
        if _still_there(folder, dfd) and files is not None:
          return _check_manifest(folder, files, kept.pop(MANIFEST, None)), kept
      finally:
        os.close(dfd)
    if time.monotonic() > deadline:
      raise CorruptError(f"{folder} was replaced again and again for {timeout:.0f} s while it was read; read it "
                         "once its writers have finished.")
    time.sleep(pause)
    pause = min(2 * pause, 0.05)


def verify_manifest(folder: Path) -> bool:
  """Checks ``folder``'s files against its manifest (one snapshot, see :func:`read_verified`).

  Returns:
    ``False`` if the folder has no manifest (written by another tool), ``True``
    if every file matches.

  Raises:
    CorruptError: a file is missing, extra, or differs in size or content, or
      the manifest itself is unreadable.
  """
  return read_verified(folder)[0]
