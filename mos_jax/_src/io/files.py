"""File I/O: atomic writes that never leave a half file, recovery from killed writers, folder manifests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mos_jax._src.errors import CorruptError


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
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{_tag()}")
  os.close(fd)
  try:
    write(tmp)
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
  export at ``folder`` once one was written.

  Example:
    >>> with atomic_dir(Path("out/peft")) as tmp:  # doctest: +SKIP
    ...   (tmp / "adapter_config.json").write_text("{}")
  """
  folder = Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  recover(folder)
  tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-{_tag()}"))
  try:
    yield tmp
  except BaseException as e:
    shutil.rmtree(tmp)
    full = _full_disk(e, folder)
    if full is not None:
      raise full from e
    raise
  if folder.exists():
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-{_tag()}"))
    os.replace(folder, old)  # a rename onto an empty folder
    os.replace(tmp, folder)
    shutil.rmtree(old)
  else:
    os.replace(tmp, folder)


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


def verify_manifest(folder: Path) -> bool:
  """Checks ``folder``'s files against its manifest.

  Returns:
    ``False`` if the folder has no manifest (written by another tool), ``True``
    if every file matches.

  Raises:
    CorruptError: a file is missing, extra, or differs in size or content, or
      the manifest itself is unreadable.
  """
  folder = Path(folder)
  manifest = folder / MANIFEST
  if not manifest.exists():
    return False
  try:
    stored = json.loads(manifest.read_text())
    if stored.get("format") != MANIFEST_FORMAT:
      raise ValueError(f"format {stored.get('format')!r}")
    files = dict(stored["files"])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CorruptError(f"{manifest} is damaged ({e}).") from e
  present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
  problems = [f"{name}: missing" for name in sorted(set(files) - present)]
  problems += [f"{name}: not in the manifest" for name in sorted(present - set(files))]
  for name in sorted(set(files) & present):
    p = folder / name
    if p.stat().st_size != files[name].get("bytes"):
      problems.append(f"{name}: {p.stat().st_size} bytes, {files[name].get('bytes')} written")
    elif _file_sha256(p) != files[name].get("sha256"):
      problems.append(f"{name}: content differs (checksum mismatch)")
  if problems:
    raise CorruptError(f"{folder} differs from what was written: " + "; ".join(problems) +
                       ". Export it again.")
  return True
