"""Digests of JSON values and arrays: the same text and hash for equal values, in any process."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np


def canonical_json(value: Any) -> str:
  """JSON with sorted keys and no spaces: the same text for equal values, in any process."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"))


def sha256_arrays(named: Iterable[tuple[str, Any]]) -> str:
  """SHA-256 over each ``(name, array)``'s name, dtype, shape and bytes, in the given order."""
  h = hashlib.sha256()
  for name, value in named:
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()
