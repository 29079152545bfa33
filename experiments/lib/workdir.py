"""Run folders that may be buckets (``gs://``): a metrics log that works there, and a clear missing-gcsfs error.

A GCS object cannot be appended to: through gcsfs, ``open("a")`` silently
rewrites the object and ``flush()`` uploads nothing until ``close()``. So a log
in a bucket is kept as a local file and uploaded whole (:class:`JsonlLog`).
Orbax writes its checkpoints to ``gs://`` itself (TensorStore), but lists and
creates folders through ``etils.epath``, which needs gcsfs too.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from etils import epath


def is_remote(path: Any) -> bool:
  """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
  return "://" in str(path)


def require_filesystem(path: Any) -> None:
  """Fails early, with the fix, when ``path`` is a bucket whose filesystem package is missing.

  Raises:
    RuntimeError: ``path`` is ``gs://...`` and gcsfs is not installed.
  """
  if str(path).startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
    raise RuntimeError(f"{path} is a GCS bucket, which needs gcsfs: .venv/bin/pip install -e '.[gcs]' "
                       "(tpu/setup.sh installs it on TPU workers).")


def read_rows(path: Any) -> list[dict]:
  """The JSON rows of a JSONL log; a torn last line (a write cut by a kill) is skipped with a warning.

  Raises:
    ValueError: a line other than the last is not JSON (the file was damaged, not cut).
  """
  lines = epath.Path(path).read_text().splitlines()
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} of {len(lines)} is not JSON ({e}); only a torn last line "
                         "is expected after a kill. Repair or remove the file to start the log anew.") from e
      warnings.warn(f"{path}: skipped a torn last line ({len(line)} characters) left by an interrupted write.",
                    stacklevel=2)
  return rows


class JsonlLog:
  """JSON rows appended to ``target``, a local file or an object in a bucket.

  Rows of steps after ``keep_until`` (those a resumed run computes again) are
  dropped when the log opens. A local ``target`` is written in place and
  flushed at each row. A bucket ``target`` is mirrored by a local file that is
  uploaded whole by :meth:`sync`, at most every ``sync_seconds`` by
  :meth:`write`, and by :meth:`close`.

  Args:
    target: where the log lives (``epath.Path``: local or ``gs://``).
    keep_until: keep the existing rows whose ``"step"`` is at most this; ``None``
      starts a new log.
    sync_seconds: minimum time between uploads of a bucket log.

  Example:
    >>> log = JsonlLog(epath.Path("gs://b/run/metrics.jsonl"), keep_until=restored_step)  # doctest: +SKIP
    >>> log.write({"step": 1, "loss": 2.3}); log.close()  # doctest: +SKIP
  """

  def __init__(self, target: epath.Path, *, keep_until: int | None = None, sync_seconds: float = 60.0):
    self.target = target
    self.sync_seconds = sync_seconds
    self._remote = is_remote(target)
    self._tmp = tempfile.TemporaryDirectory(prefix="mos_log_") if self._remote else None
    self.local = Path(self._tmp.name) / target.name if self._remote else Path(str(target))
    kept = self._kept = self._rows_until(keep_until)
    self.local.parent.mkdir(parents=True, exist_ok=True)
    self.local.write_text("".join(json.dumps(row) + "\n" for row in kept))
    self._file = self.local.open("a")
    self._synced = 0.0
    if self._remote:
      self.sync()  # the truncated log replaces the old one now, not at the first upload

  def _rows_until(self, step: int | None) -> list[dict]:
    if step is None or not self.target.exists():
      return []
    return [row for row in read_rows(self.target) if row["step"] <= step]

  def rows(self) -> list[dict]:
    """The rows kept when the log opened (a copy)."""
    return list(self._kept)

  def write(self, row: dict) -> None:
    """Appends ``row`` (flushed locally; uploaded if ``sync_seconds`` have passed)."""
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._remote and time.monotonic() - self._synced >= self.sync_seconds:
      self.sync()

  def sync(self) -> None:
    """Uploads the whole log to a bucket ``target`` (nothing to do for a local one)."""
    if self._remote:
      self._file.flush()
      self.target.write_bytes(self.local.read_bytes())
      self._synced = time.monotonic()

  def close(self) -> None:
    """Uploads (bucket) and closes the log."""
    self.sync()
    self._file.close()
    if self._tmp is not None:
      self._tmp.cleanup()
