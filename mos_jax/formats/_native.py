"""The native MoS adapter file: pools, routing arrays and config in one checksummed safetensors file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax.core import (Adapter, CorruptError, MoSConfig, Routing, atomic_file, check_pools,
                          check_params, count_params, groups_from_identity, groups_identity,
                          sha256_arrays)

#: ``format`` entry of a native adapter file's metadata.
NATIVE_FORMAT = "mos_jax.adapter/2"


def _digest(tensors: dict[str, np.ndarray]) -> str:
  return sha256_arrays((key, tensors[key]) for key in sorted(tensors))


def save_adapter(path: str | Path, adapter: Adapter) -> Path:
  """Writes the native MoS adapter: pools, routing arrays and config in one safetensors file.

  Keys are ``pools/<group>/A|B`` and ``routing/<group>/index_a|index_b``; the
  metadata holds the config, routing version, groups (paths and layouts) and a
  SHA-256 of the tensors. Pools keep their dtype, so loading resumes
  bit-exactly. Written to a temp file and renamed: never a half file.

  Args:
    path: the ``.safetensors`` file to write.
    adapter: the (trained) adapter.

  Returns:
    The written path.

  Example:
    >>> save_adapter("run/adapter.mos.safetensors", adapter)  # doctest: +SKIP
  """
  routing = adapter.routing
  check_pools(adapter.pools, routing)
  tensors = {}
  for g in routing.groups:
    for factor in ("A", "B"):
      tensors[f"pools/{g.name}/{factor}"] = np.asarray(adapter.pools[g.name][factor])
    tensors[f"routing/{g.name}/index_a"] = np.asarray(routing.index_a[g.name])
    tensors[f"routing/{g.name}/index_b"] = np.asarray(routing.index_b[g.name])
  meta = {"format": NATIVE_FORMAT, "mos_config": json.dumps(dataclasses.asdict(routing.config)),
          "routing_version": routing.version, "groups": json.dumps(groups_identity(routing.groups)),
          "base_params": str(adapter.base_params), "sha256": _digest(tensors)}
  path = Path(path)
  atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
  return path


def load_adapter(path: str | Path, *, params: Any = None) -> Adapter:
  """Reads a file written by :func:`save_adapter`.

  Args:
    path: the adapter file.
    params: the base params to apply it to; when given, the model's targeted
      kernels must be exactly the file's (else an error lists the differences).

  Returns:
    The :class:`~mos_jax.Adapter` with the stored pools and routing.

  Raises:
    CorruptError: the file is not a MoS adapter or its tensors were altered.
    MismatchError: ``params`` is another model than the adapter's (the message lists the differences).

  Example:
    >>> adapter = load_adapter("run/adapter.mos.safetensors", params=model.params)  # doctest: +SKIP
  """
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for truncated headers/data
    raise CorruptError(f"{path} is not a readable safetensors file: {e}") from e
  if meta.get("format") != NATIVE_FORMAT:
    raise CorruptError(f"{path} has format {meta.get('format')!r}, expected {NATIVE_FORMAT!r}: "
                       "not a file written by this version's save_adapter.")
  if _digest(tensors) != meta.get("sha256"):
    raise CorruptError(f"{path}: tensors differ from those saved (checksum mismatch).")
  config = MoSConfig(**json.loads(meta["mos_config"]))
  stored = json.loads(meta["groups"])
  groups = groups_from_identity(stored)
  if params is not None:
    check_params(params, config, groups, what=f"Adapter {path}")
  index_a, index_b = {}, {}
  for g in groups:
    index_a[g.name] = tensors[f"routing/{g.name}/index_a"]
    index_b[g.name] = tensors[f"routing/{g.name}/index_b"]
    index_a[g.name].setflags(write=False)
    index_b[g.name].setflags(write=False)
  routing = Routing(config=config, groups=groups, index_a=index_a, index_b=index_b,
                    version=meta["routing_version"])
  pools = {g.name: {f: jnp.asarray(tensors[f"pools/{g.name}/{f}"]) for f in ("A", "B")} for g in groups}
  check_pools(pools, routing)
  base = count_params(params) if params is not None else int(meta.get("base_params", 0))
  return Adapter(pools=pools, routing=routing, base_params=base)
