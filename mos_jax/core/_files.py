"""File helpers shared by identity, checkpoints, formats and the experiments: atomic writes, digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np


def atomic_file(path: Path, write: Callable[[str], None]) -> None:
  """Writes through a temp file in the same folder, then renames: never a half file.

  Args:
    path: the final file.
    write: ``write(tmp_path)`` fills the temp file.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(folder: Path) -> Iterator[Path]:
  """Yields a temp folder that replaces ``folder`` only once the block succeeds.

  Example:
    >>> with atomic_dir(Path("out/peft")) as tmp:  # doctest: +SKIP
    ...   (tmp / "adapter_config.json").write_text("{}")
  """
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp)
    raise
  if folder.exists():
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.replace(folder, old)  # a rename onto an empty folder
    os.replace(tmp, folder)
    shutil.rmtree(old)
  else:
    os.replace(tmp, folder)


def sha256_arrays(named: Iterable[tuple[str, Any]]) -> str:
  """SHA-256 over each ``(name, array)``'s name, dtype, shape and bytes, in the given order."""
  h = hashlib.sha256()
  for name, value in named:
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()
