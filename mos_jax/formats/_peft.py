"""PEFT LoRA export: MoS's assembled factors as a standard PEFT adapter folder, and back."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax.core import Adapter, atomic_dir, layer_factors

#: PEFT's key prefix: ``PeftModel.base_model`` (a ``LoraModel``) wraps the model as ``.model``.
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _per_layer(adapter: Adapter) -> dict[str, tuple[jax.Array, jax.Array]]:
  odd = [g.name for g in adapter.groups if g.stacked or (g.in_axes, g.out_axes) != ((0,), (1,))]
  if odd:
    raise NotImplementedError(f"Groups {odd} are stacked or einsum-style kernels, which have no per-layer "
                              "nn.Linear in PyTorch; export merged weights instead.")
  return layer_factors(adapter)


def export_peft(folder: str | Path, adapter: Adapter, *,
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
    adapter: the trained adapter.
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
  for path, (a, b) in _per_layer(adapter).items():
    module = prefix + path.replace("/", ".")
    tensors[f"{module}.lora_A.weight"] = np.asarray(a, np.float32)
    tensors[f"{module}.lora_B.weight"] = np.asarray(b, np.float32)
  peft_config = {
      "peft_type": "LORA", "task_type": task_type, "r": config.rank, "lora_alpha": config.alpha,
      "target_modules": sorted({g.name.split("/")[-1] for g in adapter.groups}),
      "lora_dropout": config.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
      "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
  }
  folder = Path(folder)
  with atomic_dir(folder) as tmp:
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
    >>> dw = mos_jax.core.delta_weight(*map(jnp.asarray, factors["model/layers/0/self_attn/q_proj"]), scale)  # doctest: +SKIP
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
