"""Adapter files: native MoS (pools + routing), PEFT LoRA, and merged HF Flax weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax._adapter import Adapter, _count
from mos_jax._io import atomic_file, sha256_arrays
from mos_jax._assemble import assemble, layer_factors
from mos_jax._checkpoint import CheckpointCorruptError, CheckpointMismatchError, differences, groups_identity
from mos_jax._config import MoSConfig
from mos_jax._merge import merge
from mos_jax._pools import Pools, check_pools
from mos_jax._routing import Routing
from mos_jax._targets import Group, find_groups

#: ``format`` entry of a native adapter file's metadata.
NATIVE_FORMAT = "mos_jax.adapter/1"
#: PEFT's key prefix: ``PeftModel.base_model`` (a ``LoraModel``) wraps the model as ``.model``.
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def _atomic_dir(folder: Path) -> Iterator[Path]:
  """Yields a temp folder that replaces ``folder`` only once the block succeeds."""
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


def _digest(tensors: dict[str, np.ndarray]) -> str:
  return sha256_arrays((key, tensors[key]) for key in sorted(tensors))


def save_mos_adapter(path: str | Path, pools: Pools, routing: Routing) -> Path:
  """Writes the native MoS adapter: pools, routing arrays and config in one safetensors file.

  Keys are ``pools/<group>/A|B`` and ``routing/<group>/index_a|index_b``; the
  metadata holds the config, routing version, groups and a SHA-256 of the
  tensors. Pools keep their dtype, so loading resumes bit-exactly. Written to a
  temp file and renamed.

  Args:
    path: the ``.safetensors`` file to write.
    pools: the trained pools.
    routing: the adapter's routing.

  Returns:
    The written path.

  Example:
    >>> save_mos_adapter("run/adapter.mos.safetensors", pools, adapter.routing)  # doctest: +SKIP
  """
  check_pools(pools, routing)
  tensors = {}
  for g in routing.groups:
    for factor in ("A", "B"):
      tensors[f"pools/{g.name}/{factor}"] = np.asarray(pools[g.name][factor])
    tensors[f"routing/{g.name}/index_a"] = np.asarray(routing.index_a[g.name])
    tensors[f"routing/{g.name}/index_b"] = np.asarray(routing.index_b[g.name])
  meta = {"format": NATIVE_FORMAT, "mos_config": json.dumps(dataclasses.asdict(routing.config)),
          "routing_version": routing.version, "groups": json.dumps(groups_identity(routing.groups)),
          "sha256": _digest(tensors)}
  path = Path(path)
  atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
  return path


def load_mos_adapter(path: str | Path, *, params: Any = None) -> Adapter:
  """Reads a file written by :func:`save_mos_adapter`.

  Args:
    path: the adapter file.
    params: the base params to apply it to; when given, the model's matched
      modules must equal the file's groups (else an error lists the differences).

  Returns:
    An :class:`Adapter` with the stored pools and routing (``base_params`` is 0
    without ``params``).

  Raises:
    CheckpointCorruptError: the file is not a MoS adapter or its tensors were altered.
    CheckpointMismatchError: ``params`` is another model than the adapter's.

  Example:
    >>> adapter = load_mos_adapter("run/adapter.mos.safetensors", params=model.params)  # doctest: +SKIP
  """
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for truncated headers/data
    raise CheckpointCorruptError(f"{path} is not a readable safetensors file: {e}") from e
  if meta.get("format") != NATIVE_FORMAT:
    raise CheckpointCorruptError(f"{path} has format {meta.get('format')!r}, expected {NATIVE_FORMAT!r}: "
                                 "not a file written by save_mos_adapter.")
  if _digest(tensors) != meta["sha256"]:
    raise CheckpointCorruptError(f"{path}: tensors differ from those saved (checksum mismatch).")
  config = MoSConfig(**json.loads(meta["mos_config"]))
  stored = json.loads(meta["groups"])
  groups = tuple(Group(name=name, **{**g, "paths": tuple(g["paths"])}) for name, g in stored.items())
  if params is not None:
    diffs = differences({"groups": stored}, {"groups": groups_identity(find_groups(params, config))},
                        names=("the adapter file", "this model"))
    if diffs:
      raise CheckpointMismatchError(f"Adapter {path} was made for another model:\n  - " + "\n  - ".join(diffs)
                                    + "\nLoad it with the base model it was trained on.")
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
  return Adapter(pools=pools, routing=routing, base_params=_count(params) if params is not None else 0)


def _per_layer(pools: Pools, routing: Routing) -> dict[str, tuple[jax.Array, jax.Array]]:
  stacked = [g.name for g in routing.groups if g.stacked]
  if stacked:
    raise NotImplementedError(f"Groups {stacked} are stacked (nn.scan) kernels, which have no per-layer "
                              "module names in PyTorch; unroll the scan before exporting.")
  return layer_factors(assemble(pools, routing), routing)


def export_peft(folder: str | Path, pools: Pools, routing: Routing, *,
                base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
                prefix: str = PEFT_PREFIX) -> Path:
  """Writes the assembled factors as a standard PEFT LoRA adapter folder.

  MoS's forward is LoRA's with assembled factors, so this is exact: each
  adapted module gets ``lora_A.weight = A_i`` ``(r, d_in)`` and
  ``lora_B.weight = B_i`` ``(d_out, r)`` in float32 (exact for float32 and
  bfloat16 pools), under the PyTorch module name (the Flax path with "." for
  "/"). ``r`` is the active rank and ``lora_alpha`` the MoS alpha, so PEFT's
  ``lora_alpha / r`` equals MoS's ``alpha / rank``. ``target_modules`` are the
  leaf names; modules PEFT wraps by name but MoS did not adapt have no weights
  in the file and keep PEFT's zero-initialised ``lora_B``, so they add nothing.

  Args:
    folder: output folder (replaced whole, atomically).
    pools: the trained pools.
    routing: the adapter's routing.
    base_model_name_or_path: recorded in ``adapter_config.json``.
    task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``None``).
    prefix: key prefix; PEFT's own is ``"base_model.model."``.

  Returns:
    The folder.

  Example:
    >>> export_peft("out/peft", pools, adapter.routing, base_model_name_or_path="meta-llama/...")  # doctest: +SKIP
    >>> # PyTorch: PeftModel.from_pretrained(LlamaForCausalLM(...), "out/peft")
  """
  config = routing.config
  tensors = {}
  for path, (a, b) in _per_layer(pools, routing).items():
    module = prefix + path.replace("/", ".")
    tensors[f"{module}.lora_A.weight"] = np.asarray(a, np.float32)
    tensors[f"{module}.lora_B.weight"] = np.asarray(b, np.float32)
  peft_config = {
      "peft_type": "LORA", "task_type": task_type, "r": config.rank, "lora_alpha": config.alpha,
      "target_modules": sorted({g.name.split("/")[-1] for g in routing.groups}),
      "lora_dropout": config.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
      "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
  }
  folder = Path(folder)
  with _atomic_dir(folder) as tmp:
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
  return folder


def load_peft_factors(folder: str | Path, *, prefix: str = PEFT_PREFIX,
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
  """Reads a PEFT LoRA folder back into Flax-path factors.

  Args:
    folder: a folder written by :func:`export_peft` (or by PEFT).
    prefix: the key prefix to strip.

  Returns:
    ``({flax module path: (A (r, d_in), B (d_out, r))}, lora_alpha / r)``.

  Example:
    >>> factors, scale = load_peft_factors("out/peft")  # doctest: +SKIP
    >>> dw = delta_weight(*map(jnp.asarray, factors["model/layers/0/self_attn/q_proj"]), scale)  # doctest: +SKIP
  """
  folder = Path(folder)
  peft_config = json.loads((folder / PEFT_CONFIG).read_text())
  factors: dict[str, dict[str, np.ndarray]] = {}
  with safe_open(str(folder / PEFT_WEIGHTS), framework="numpy") as f:
    for key in f.keys():
      if not key.startswith(prefix):
        raise ValueError(f"{folder / PEFT_WEIGHTS}: key {key!r} lacks the prefix {prefix!r}; pass prefix=.")
      module, factor, _ = key[len(prefix):].rsplit(".", 2)
      factors.setdefault(module.replace(".", "/"), {})[factor] = f.get_tensor(key)
  scale = peft_config["lora_alpha"] / peft_config["r"]
  return {path: (ab["lora_A"], ab["lora_B"]) for path, ab in factors.items()}, scale


def export_merged(folder: str | Path, model: Any, params: Any, pools: Pools, routing: Routing) -> Path:
  """Saves ``W + ΔW`` for every adapted kernel as a HF Flax ``model.safetensors`` folder.

  The folder (``config.json``, ``model.safetensors``, generation config) loads
  with ``type(model).from_pretrained(folder)`` and needs no MoS code.

  Args:
    folder: output folder (replaced whole, atomically).
    model: the ``transformers`` Flax model (for its config and ``save_pretrained``).
    params: its base params.
    pools: the trained pools.
    routing: the adapter's routing.

  Returns:
    The folder.

  Example:
    >>> export_merged("out/merged", model, model.params, pools, adapter.routing)  # doctest: +SKIP
    >>> FlaxLlamaForCausalLM.from_pretrained("out/merged")  # doctest: +SKIP
  """
  merged = merge(params, assemble(pools, routing), routing)
  folder = Path(folder)
  with _atomic_dir(folder) as tmp:
    # transformers writes safetensors only unsharded (its sharded path falls back to
    # msgpack), so the shard limit is set above any model this targets.
    model.save_pretrained(str(tmp), params=merged, safe_serialization=True, max_shard_size="10000GB")
  return folder
