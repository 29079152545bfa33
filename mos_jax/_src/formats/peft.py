"""PEFT LoRA export: MoS's assembled factors as a standard PEFT adapter folder, and back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.assemble import layer_factors
from mos_jax._src.errors import CorruptError
from mos_jax._src.io.files import atomic_dir, recover, verify_manifest, write_manifest

#: PEFT's key prefix: ``PeftModel.base_model`` (a ``LoraModel``) wraps the model as ``.model``.
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


#: A PEFT naming rule: a regex fullmatched against a module path, and the PyTorch module name(s)
#: (``re`` templates, ``\\1`` for groups; ``{layer}`` for a stacked kernel's layer index) it becomes.
#: Several names split ``B``'s rows into that many equal blocks, in order (a fused ``kv`` kernel
#: becomes ``k_proj`` and ``v_proj``).
NameRule = tuple[str, tuple[str, ...]]


def _rule(names: Sequence[NameRule], path: str) -> tuple[re.Match, tuple[str, ...]]:
  for pattern, targets in names:
    match = re.fullmatch(pattern, path)
    if match:
      return match, targets
  raise ValueError(f"No PEFT naming rule matches {path!r}; add one to names=.")


def _torch_modules(adapter: Adapter, names: Sequence[NameRule] | None,
                   ) -> dict[str, tuple[jax.Array, jax.Array]]:
  per_layer = layer_factors(adapter)
  out = {}
  for g in adapter.groups:
    for path in g.paths:
      a, b = per_layer[path]
      if names is None:
        if g.stacked or (g.in_axes, g.out_axes) != ((0,), (1,)):
          raise NotImplementedError(
              f"Group {g.name!r} is {'a stacked' if g.stacked else 'a multi-dim or (out, in)'} kernel {g.full_shape}: name "
              "its PyTorch modules with names=[(regex, (torch names...))] (e.g. mos_jax.nnx.PEFT_NAMES['gemma3']; "
              "'{layer}' stands for a stacked kernel's layer index).")
        out[path.replace("/", ".")] = (a, b)
        continue
      match, targets = _rule(names, path)
      layers = range(g.num_layers) if g.stacked else [None]
      for layer in layers:
        a_i, b_i = (a, b) if layer is None else (a[layer], b[layer])
        rows = b_i.shape[0] // len(targets)
        if rows * len(targets) != b_i.shape[0]:
          raise ValueError(f"{path!r}: d_out={b_i.shape[0]} does not split into {len(targets)} modules {targets}.")
        for k, target in enumerate(targets):
          name = match.expand(target)
          if layer is not None:
            if "{layer}" not in target:
              raise ValueError(f"{path!r} is a stacked kernel: its PEFT name {target!r} needs '{{layer}}'.")
            name = name.replace("{layer}", str(layer))
          out[name] = (a_i, b_i[k * rows:(k + 1) * rows])
  return out


def export_peft(folder: str | Path, adapter: Adapter, *, names: Sequence[NameRule] | None = None,
                base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
                prefix: str = PEFT_PREFIX) -> Path:
  """Writes the assembled factors as a standard PEFT LoRA adapter folder.

  MoS's forward is LoRA's with assembled factors, so this is exact: each
  adapted module gets ``lora_A.weight = A_i`` ``(r, d_in)`` and
  ``lora_B.weight = B_i`` ``(d_out, r)`` in float32 (exact for float32 and
  bfloat16 pools), under the PyTorch module name: the Flax path with "." for
  "/", or the name a ``names`` rule gives. Einsum-style kernels need rules: their
  contracted dims flatten (in kernel order) to the columns of ``lora_A`` and
  their free dims to the rows of ``lora_B``, which is PyTorch ``nn.Linear``'s
  layout for Tunix's kernels (heads, then head dim). ``r`` is the active rank and ``lora_alpha`` the MoS alpha, so PEFT's
  ``lora_alpha / r`` equals MoS's ``alpha / rank``. ``target_modules`` are the
  leaf names; modules PEFT wraps by name but MoS did not adapt have no weights
  in the file and keep PEFT's zero-initialised ``lora_B``, so they add nothing.

  Args:
    folder: output folder (replaced whole, atomically).
    adapter: the trained adapter.
    names: naming rules, each ``(regex on the module path, (torch name, ...))``;
      ``None`` keeps the Flax paths (dense kernels only).
    base_model_name_or_path: recorded in ``adapter_config.json``.
    task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``None``).
    prefix: key prefix; PEFT's own is ``"base_model.model."``.

  Returns:
    The folder.

  Example:
    >>> export_peft("out/peft", adapter, base_model_name_or_path="meta-llama/...")  # doctest: +SKIP
    >>> # PyTorch: PeftModel.from_pretrained(LlamaForCausalLM(...), "out/peft")
  """
  config = adapter.config
  tensors = {}
  modules = _torch_modules(adapter, names)
  for name, (a, b) in modules.items():
    tensors[f"{prefix}{name}.lora_A.weight"] = np.asarray(a, np.float32)
    tensors[f"{prefix}{name}.lora_B.weight"] = np.asarray(b, np.float32)
  peft_config = {
      "peft_type": "LORA", "task_type": task_type, "r": config.rank, "lora_alpha": config.alpha,
      "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
      "lora_dropout": config.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
      "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
  }
  folder = Path(folder)
  with atomic_dir(folder) as tmp:
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
    write_manifest(tmp)  # PEFT ignores it; load_peft_factors and verify_export check it
  return folder


def verify_export(folder: str | Path) -> bool:
  """Checks a folder written by :func:`export_peft` or ``mos_jax.hf.export_merged``.

  First repairs an interrupted replace (the previous export comes back, dead
  writers' temp folders go), then checks every file against the folder's
  manifest of sizes and SHA-256s.

  Args:
    folder: the export folder.

  Returns:
    ``True`` if every file matches; ``False`` if the folder has no manifest
    (written by another tool or an older version).

  Raises:
    FileNotFoundError: no such folder (and nothing to restore).
    CorruptError: a file is missing, extra, truncated or altered.

  Example:
    >>> verify_export("out/peft")  # doctest: +SKIP
    True
  """
  folder = Path(folder)
  try:
    recover(folder)
  except OSError:  # a read-only location: nothing to repair from here
    pass
  if not folder.is_dir():
    raise FileNotFoundError(f"No export folder {folder}.")
  return verify_manifest(folder)


def load_peft_factors(folder: str | Path, *, prefix: str = PEFT_PREFIX,
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
  """Reads a PEFT LoRA folder back into Flax-path factors.

  Args:
    folder: a folder written by :func:`export_peft` (or by PEFT).
    prefix: the key prefix to strip.

  Returns:
    ``({flax module path: (A (r, d_in), B (d_out, r))}, lora_alpha / r)``.

  Raises:
    CorruptError: the folder's files differ from its manifest, or cannot be read.

  Example:
    >>> factors, scale = load_peft_factors("out/peft")  # doctest: +SKIP
    >>> dw = mos_jax.core.delta_weight(*map(jnp.asarray, factors["model/layers/0/self_attn/q_proj"]), scale)  # doctest: +SKIP
  """
  folder = Path(folder)
  verify_export(folder)
  try:
    peft_config = json.loads((folder / PEFT_CONFIG).read_text())
    scale = peft_config["lora_alpha"] / peft_config["r"]
    with safe_open(str(folder / PEFT_WEIGHTS), framework="numpy") as f:
      keys, tensors = list(f.keys()), {key: f.get_tensor(key) for key in f.keys()}
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
    raise CorruptError(f"{folder} is not a readable PEFT adapter folder: {e!r}") from e
  except Exception as e:  # safetensors raises its own error types for truncated files
    raise CorruptError(f"{folder / PEFT_WEIGHTS} is not a readable safetensors file: {e}") from e
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key in keys:
    if not key.startswith(prefix):
      raise ValueError(f"{folder / PEFT_WEIGHTS}: key {key!r} lacks the prefix {prefix!r}; pass prefix=.")
    module, factor, _ = key[len(prefix):].rsplit(".", 2)
    factors.setdefault(module.replace(".", "/"), {})[factor] = tensors[key]
  return {path: (ab["lora_A"], ab["lora_B"]) for path, ab in factors.items()}, scale
