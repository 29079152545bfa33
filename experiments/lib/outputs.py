"""The files a training run leaves beside its metrics: the native adapter, a head, ``mos_config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

import mos_jax
from mos_jax.core import ROUTING_VERSION, path_str
from mos_jax.formats import atomic_file
from experiments.lib.config import TrainConfig

#: The run's record beside the native adapter (not PEFT's ``adapter_config.json``).
RUN_CONFIG = "mos_config.json"


def save_outputs(out_dir: Path, cfg: TrainConfig, *, adapter: mos_jax.Adapter | None = None,
                 head: Any = None) -> Path | None:
  """Writes the trained adapter, the head (if any) and the run's ``mos_config.json``.

  ``adapter.safetensors`` is :func:`mos_jax.save_adapter`'s native file (pools,
  routing, config), so :func:`mos_jax.load_adapter` reads it back; a
  classifier's head goes to ``head.safetensors`` (keys are its leaf paths).
  ``mos_config.json`` records the run (training settings, MoS config, groups). It is not
  named ``adapter_config.json``: that name is PEFT's, for the folder of
  :func:`mos_jax.export_peft`, and ``PeftConfig.from_pretrained`` would misread this one.

  Returns:
    The adapter file's path (``None`` without an adapter).
  """
  path = mos_jax.save_adapter(out_dir / "adapter.safetensors", adapter) if adapter is not None else None
  if head is not None:
    flat = {path_str(key): np.asarray(leaf) for key, leaf in jax.tree_util.tree_flatten_with_path(head)[0]}
    atomic_file(out_dir / "head.safetensors", lambda p: save_file(flat, p))
  meta = {"train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "mos"},
          "mos": dataclasses.asdict(cfg.mos) if cfg.mos else None,
          "routing_version": ROUTING_VERSION,
          "groups": [g.name for g in adapter.groups] if adapter is not None else []}
  atomic_file(out_dir / RUN_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
  return path
