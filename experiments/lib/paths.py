"""Where things are: the repository, the committed results and the data folders."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Committed benchmark and experiment results.
RESULTS_DIR = REPO / "experiments" / "results"
#: Data sets beside the checkout (``../shared/data/<name>``), when present.
SHARED_DATA = REPO.parent / "shared" / "data"


def default_data_dir(name: str) -> str | None:
  """``$MOS_DATA_DIR/<name>`` if that variable is set, else ``../shared/data/<name>`` if it exists, else ``None``."""
  if os.environ.get("MOS_DATA_DIR"):
    return os.path.join(os.environ["MOS_DATA_DIR"], name)
  shared = SHARED_DATA / name
  return str(shared) if shared.is_dir() else None
