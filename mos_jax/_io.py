"""File helpers shared by checkpoints, exports and the experiments: atomic writes, digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

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


def sha256_arrays(named: Iterable[tuple[str, Any]]) -> str:
  """SHA-256 over each ``(name, array)``'s name, dtype, shape and bytes, in the given order."""
  h = hashlib.sha256()
  for name, value in named:
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()
