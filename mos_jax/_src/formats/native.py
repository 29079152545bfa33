"""The native MoS adapter file: pools, routing arrays and config in one checksummed safetensors file."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax._src.core.adapter import Adapter, count_params
from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.hashing import canonical_json, sha256_arrays
from mos_jax._src.core.identity import as_json, groups_from_identity, groups_identity
from mos_jax._src.core.pools import check_pools, require_dtype
from mos_jax._src.core.routing import AdapterSpec
from mos_jax._src.core.targets import check_params
from mos_jax._src.errors import CorruptError
from mos_jax._src.io.files import atomic_file

#: ``format`` entry of a native adapter file's header.
NATIVE_FORMAT = "mos_jax.adapter/3"
#: The one safetensors metadata key holding the header (JSON, sorted keys). One key, because
#: safetensors writes its metadata map in a per-process random order: two keys would make
#: identical adapters hash differently.
HEADER_KEY = "mos_jax.adapter"
#: Format 2 kept the header in several metadata keys, outside the checksum; still readable.
_LEGACY_FORMAT = "mos_jax.adapter/2"


def _digest(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> str:
  """SHA-256 over the header (without its ``sha256`` entry) and every tensor's name, dtype, shape, bytes."""
  h = hashlib.sha256(canonical_json({k: v for k, v in header.items() if k != "sha256"}).encode())
  h.update(sha256_arrays((key, tensors[key]) for key in sorted(tensors)).encode())
  return h.hexdigest()


def save_adapter(path: str | Path, adapter: Adapter) -> Path:
  """Writes the native MoS adapter: pools, routing arrays and config in one safetensors file.

  Keys are ``pools/<group>/A|B`` and ``routing/<group>/index_a|index_b``; the
  header (one metadata entry, JSON with sorted keys) holds the format, config,
  routing version, groups (paths and layouts), the base model's size and a
  SHA-256 over the header and the tensors, so one flipped bit anywhere is
  reported as damage. Pools keep their dtype, so loading resumes bit-exactly;
  identical adapters give byte-identical files. Written to a temp file and
  renamed: never a half file.

  Args:
    path: the ``.safetensors`` file to write.
    adapter: the (trained) adapter.

  Returns:
    The written path.

  Example:
    >>> save_adapter("run/adapter.mos.safetensors", adapter)  # doctest: +SKIP
  """
  spec = adapter.spec
  check_pools(adapter.pools, spec)
  tensors = {}
  for g in spec.groups:
    for factor in ("A", "B"):
      tensors[f"pools/{g.name}/{factor}"] = np.asarray(adapter.pools[g.name][factor])
    tensors[f"routing/{g.name}/index_a"] = np.asarray(spec.index_a[g.name])
    tensors[f"routing/{g.name}/index_b"] = np.asarray(spec.index_b[g.name])
  header = {"format": NATIVE_FORMAT, "mos_config": dataclasses.asdict(spec.config),
            "routing_version": spec.version, "groups": groups_identity(spec.groups),
            "base_params": int(adapter.base_params)}
  header = as_json(header)  # tuples as lists, exactly as they read back
  header["sha256"] = _digest(header, tensors)
  path = Path(path)
  atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata={HEADER_KEY: canonical_json(header)}))
  return path


def _read_header(path: Any, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """The verified header of a format-3 file (or a format-2 file's, converted); ``CorruptError`` if damaged."""
  if HEADER_KEY in meta:
    try:
      header = json.loads(meta[HEADER_KEY])
    except ValueError as e:
      raise CorruptError(f"{path}: the adapter header is not valid JSON ({e}): the file is damaged.") from e
    if not isinstance(header, dict) or header.get("format") != NATIVE_FORMAT:
      found = header.get("format") if isinstance(header, dict) else type(header).__name__
      raise CorruptError(f"{path} has format {found!r}, expected {NATIVE_FORMAT!r}: "
                         "not a file written by this version's save_adapter, or damaged.")
    if _digest(header, tensors) != header.get("sha256"):
      raise CorruptError(f"{path}: header or tensors differ from those saved (checksum mismatch): "
                         "the file was altered or damaged.")
    return header
  if meta.get("format") == _LEGACY_FORMAT:
    # Format 2 checksummed the tensors only; its header is read as is, with a warning.
    if sha256_arrays((key, tensors[key]) for key in sorted(tensors)) != meta.get("sha256"):
      raise CorruptError(f"{path}: tensors differ from those saved (checksum mismatch).")
    warnings.warn(f"{path} is a format-2 adapter file, whose header is not covered by its checksum; "
                  "save it again to upgrade it to format 3.", stacklevel=3)
    try:
      return {"mos_config": json.loads(meta["mos_config"]), "groups": json.loads(meta["groups"]),
              "routing_version": meta["routing_version"], "base_params": int(meta.get("base_params", 0))}
    except (KeyError, ValueError) as e:
      raise CorruptError(f"{path}: format-2 header is incomplete or undecodable ({e!r}).") from e
  found = meta.get("format", meta.get(HEADER_KEY))
  raise CorruptError(f"{path} has format {found!r}, expected {NATIVE_FORMAT!r}: "
                     "not a file written by this version's save_adapter.")


def load_adapter(path: str | Path, *, params: Any = None) -> Adapter:
  """Reads a file written by :func:`save_adapter`.

  Args:
    path: the adapter file.
    params: the base params to apply it to; when given, the model's targeted
      kernels must be exactly the file's (else an error lists the differences).

  Returns:
    The :class:`~mos_jax.Adapter` with the stored pools and routing.

  Raises:
    FileNotFoundError: no file at ``path``.
    IsADirectoryError: ``path`` is a folder (a PEFT export or a checkpoint, not an adapter file).
    CorruptError: the file is not a MoS adapter, or its header or tensors were
      altered (checksum), or its contents do not fit together.
    MismatchError: ``params`` is another model than the adapter's (the message lists the differences).
    ValueError: the adapter's pools are float64 and JAX's 64-bit mode is off.

  Example:
    >>> adapter = load_adapter("run/adapter.mos.safetensors", params=model.params)  # doctest: +SKIP
  """
  if Path(path).is_dir():
    raise IsADirectoryError(errno.EISDIR, f"{path} is a folder, not an adapter file: load_adapter reads the one "
                            "file save_adapter wrote (a PEFT export folder is read with "
                            "mos_jax.formats.load_peft_factors, a checkpoint with TrainCheckpointer)", str(path))
  if not Path(path).exists():
    raise FileNotFoundError(errno.ENOENT, "No adapter file (check the path, or save_adapter it first)", str(path))
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for truncated headers/data
    raise CorruptError(f"{path} is not a readable safetensors file: {e}") from e
  header = _read_header(path, meta, tensors)
  try:
    config = MoSConfig(**header["mos_config"])
    groups = groups_from_identity(header["groups"])
    expected = {f"{kind}/{g.name}/{leaf}" for g in groups
                for kind, leaves in (("pools", ("A", "B")), ("routing", ("index_a", "index_b"))) for leaf in leaves}
    if set(tensors) != expected:
      raise ValueError(f"tensors {sorted(set(tensors) ^ expected)} are missing or unexpected")
    index_a = {g.name: tensors[f"routing/{g.name}/index_a"] for g in groups}
    index_b = {g.name: tensors[f"routing/{g.name}/index_b"] for g in groups}
    for table in (index_a, index_b):
      for index in table.values():
        index.setflags(write=False)
    spec = AdapterSpec(config=config, groups=groups, index_a=index_a, index_b=index_b,
                      version=header["routing_version"])  # checks the shard ids against the pools
    arrays = {g.name: {f: tensors[f"pools/{g.name}/{f}"] for f in ("A", "B")} for g in groups}
    check_pools(arrays, spec)
  except (KeyError, TypeError, ValueError) as e:
    # The checksum held, so the file was written like this: by another tool or edited by hand.
    raise CorruptError(f"{path}: the adapter's contents do not fit together ({e}).") from e
  require_dtype(config.pool_dtype, f"Adapter {path}")
  pools = {name: {f: jnp.asarray(x) for f, x in entry.items()} for name, entry in arrays.items()}
  if params is not None:
    check_params(params, config, groups, what=f"Adapter {path}")
  base = count_params(params) if params is not None else int(header.get("base_params", 0))
  return Adapter(pools=pools, spec=spec, base_params=base)
