"""PEFT LoRA export: MoS's assembled factors as a standard PEFT adapter folder, and back."""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import safetensors.numpy
from safetensors.numpy import save_file

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.assemble import layer_factors
from mos_jax._src.errors import CorruptError
from mos_jax._src.io.files import atomic_dir, read_verified, recover, write_manifest

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
  out: dict[str, tuple[jax.Array, jax.Array]] = {}
  source: dict[str, str] = {}  # PEFT name -> the module (and layer) it came from

  def put(name: str, origin: str, a: jax.Array, b: jax.Array) -> None:
    if name in source:
      raise ValueError(
          f"PEFT naming maps two modules to one PEFT module {name!r}: {source[name]} and {origin}. One would "
          "overwrite the other in the export. Make each rule give every module (and layer) its own name: keep the "
          "layer index in it (a regex group such as r'layers/(\\d+)/...' -> r'model.layers.\\1...', or '{layer}' "
          "for a stacked kernel).")
    source[name], out[name] = origin, (a, b)

  for g in adapter.groups:
    for path in g.paths:
      a, b = per_layer[path]
      if names is None:
        if g.stacked or (g.in_axes, g.out_axes) != ((0,), (1,)):
          raise NotImplementedError(
              f"Group {g.name!r} is {'a stacked' if g.stacked else 'a multi-dim or (out, in)'} kernel {g.full_shape}: name "
              "its PyTorch modules with names=[(regex, (torch names...))] (e.g. mos_jax.nnx.PEFT_NAMES['gemma3']; "
              "'{layer}' stands for a stacked kernel's layer index).")
        put(path.replace("/", "."), repr(path), a, b)
        continue
      match, targets = _rule(names, path)
      if not g.stacked and any("{layer}" in t for t in targets):
        raise ValueError(f"{path!r} is not a stacked kernel, so its rule's '{{layer}}' in {targets} has no layer "
                         "to stand for: take the layer index from the path with a regex group (\\1).")
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
          origin = repr(path) + (f" layer {layer}" if layer is not None else "") + \
              (f" (rows {k * rows}:{(k + 1) * rows})" if len(targets) > 1 else "")
          put(name, origin, a_i, b_i[k * rows:(k + 1) * rows])
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
  manifest of sizes and SHA-256s, as one snapshot: an export replaced while it
  is read is read again, never judged half old, half new.

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
  return _read_export(Path(folder))[0]


def _read_export(folder: Path, keep: Sequence[str] = ()) -> tuple[bool, dict[str, bytes]]:
  try:
    recover(folder)
  except OSError:  # a read-only location: nothing to repair from here
    pass
  return read_verified(folder, keep)


class PeftModule(NamedTuple):
  """One LoRA module of a PEFT folder, as :func:`load_peft` returns it.

  Attributes:
    a: ``lora_A.weight``, ``(r, d_in)``.
    b: ``lora_B.weight``, ``(d_out, r)``.
    scale: PEFT's scaling of this module: ``alpha / r``, or ``alpha / sqrt(r)``
      with ``use_rslora`` (``r`` and ``alpha`` after ``rank_pattern`` and
      ``alpha_pattern``), so ``ΔW = scale · B A`` in PyTorch's ``(out, in)`` layout.
  """

  a: np.ndarray
  b: np.ndarray
  scale: float


#: LoraConfig options that change what a module computes beyond ``scale · B A`` (or need weights a LoRA
#: factor pair does not hold); a folder that sets any of them is refused by name.
_REFUSED = {
    "use_dora": "DoRA rescales each output column by a learned magnitude, which lora_A/lora_B do not hold",
    "modules_to_save": "the folder holds full copies of these modules' weights, not low-rank factors",
    "trainable_token_indices": "the folder holds trained embedding rows, not low-rank factors",
    "lora_bias": "lora_B carries a bias",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "the model's layers are duplicated before the adapters apply",
    "target_parameters": "LoRA on nn.Parameter tensors (e.g. MoE experts), not on modules",
    "megatron_config": "Megatron-parallel layers split the factors",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA changes the forward",
    "monteclora_config": "MonteCLoRA samples the factors",
    "arrow_config": "Arrow routes between several LoRA experts",
    "kasa_config": "KaSA adds a singular-value term",
}
#: Options that only select modules, describe the run or set up training; read and ignored.
_IGNORED = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "fan_in_fan_out", "bias",
    "init_lora_weights", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config", "eva_config", "loftq_config",
    "corda_config", "lora_ga_config",
}
#: ``init_lora_weights`` values that move the base weights (the adapter applies to a changed model).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
  """PEFT's ``get_pattern_key``: the first pattern that fullmatches the module name or a dotted suffix of it."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _check_peft_config(config: Any, where: Path) -> None:
  """Raises ``ValueError`` naming every option of ``adapter_config.json`` that LoRA factors cannot express."""
  if not isinstance(config, dict):
    raise CorruptError(f"{where} is not a JSON object.")
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA adapters hold LoRA factors "
                     "(lora_A, lora_B) that mos_jax reads.")
  problems = [f"{k}={config[k]!r} ({why})" for k, why in _REFUSED.items() if config.get(k)]
  if config.get("bias", "none") != "none":
    problems.append(f"bias={config['bias']!r} (the folder holds trained biases of the base modules)")
  init = config.get("init_lora_weights")
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    problems.append(f"init_lora_weights={init!r} (the factors apply to base weights that this initialisation "
                    "changed; save the adapter converted with path_initial_model_for_weight_conversion)")
  problems += [f"{k}={config[k]!r} (an option this version does not know; it may change the forward)"
               for k in sorted(set(config) - set(_REFUSED) - _IGNORED) if config[k]]
  if problems:
    raise ValueError(f"{where} sets " + "; ".join(problems) + ". mos_jax reads plain LoRA (per-module rank and "
                     "alpha, rsLoRA) only: export the adapter without these options, or merge it in PyTorch.")


def _refused_key(key: str) -> str | None:
  """Why a tensor key of a PEFT LoRA file is not a LoRA factor, or ``None`` for ``lora_A/B.weight``."""
  if key.endswith((".lora_A.weight", ".lora_B.weight")):
    return None
  if ".lora_embedding_A" in key or ".lora_embedding_B" in key:
    return "LoRA on an embedding (lora_embedding_A/B): its factors index token ids, they are no linear map of an input"
  if ".lora_magnitude_vector" in key:
    return "a DoRA magnitude vector"
  if key.endswith(".lora_B.bias"):
    return "a lora_B bias (lora_bias=True)"
  return "not a LoRA factor (a module saved whole, e.g. modules_to_save, or another adapter type)"


def load_peft(folder: str | Path, *, prefix: str = PEFT_PREFIX) -> dict[str, PeftModule]:
  """Reads a PEFT LoRA folder (written by :func:`export_peft` or by PyTorch PEFT), module by module.

  What PEFT's ``LoraConfig`` can say about the factors is applied: per-module
  rank and alpha (``rank_pattern``, ``alpha_pattern``, matched as PEFT matches
  them) and rsLoRA's ``alpha / sqrt(r)`` scaling. Options whose effect a pair of
  LoRA factors cannot carry are refused by name: DoRA, ``modules_to_save``,
  LoRA on embeddings (``lora_embedding_A/B``), ``lora_bias``, trained biases,
  initialisations that change the base weights (PiSSA, OLoRA, LoftQ, ...) and
  options this version does not know. The folder is read as one snapshot and
  checked against its manifest when it has one (exports of :func:`export_peft`).

  Args:
    folder: the PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    prefix: the key prefix to strip (PEFT's is ``"base_model.model."``).

  Returns:
    ``{flax module path ("/" for "."): PeftModule(a, b, scale)}``.

  Raises:
    FileNotFoundError: no such folder, or it lacks ``adapter_config.json`` or
      ``adapter_model.safetensors``.
    ValueError: an option or a tensor that LoRA factors cannot express (named),
      or keys without ``prefix``.
    CorruptError: files differ from the folder's manifest, cannot be read, or
      do not fit together (a factor missing, a rank other than the config's).

  Example:
    >>> modules = load_peft("out/peft")  # doctest: +SKIP
    >>> m = modules["model/layers/0/self_attn/q_proj"]  # doctest: +SKIP
    >>> dw = m.scale * m.b @ m.a  # doctest: +SKIP
  """
  folder = Path(folder)
  _, files = _read_export(folder, (PEFT_CONFIG, PEFT_WEIGHTS))
  for name in (PEFT_CONFIG, PEFT_WEIGHTS):
    if name not in files:
      other = " (adapter_model.bin is PyTorch's pickle format: save with safe_serialization=True)" \
          if name == PEFT_WEIGHTS and (folder / "adapter_model.bin").exists() else ""
      raise FileNotFoundError(errno.ENOENT, f"Not a PEFT adapter folder: no {name}{other}", str(folder / name))
  try:
    config = json.loads(files[PEFT_CONFIG])
  except ValueError as e:
    raise CorruptError(f"{folder / PEFT_CONFIG} is not valid JSON: {e}") from e
  _check_peft_config(config, folder / PEFT_CONFIG)
  try:
    tensors = safetensors.numpy.load(files[PEFT_WEIGHTS])
  except Exception as e:  # safetensors raises its own error types for truncated files
    raise CorruptError(f"{folder / PEFT_WEIGHTS} is not a readable safetensors file: {e}") from e
  refused = {key: why for key in tensors if (why := _refused_key(key)) is not None}
  if refused:
    shown = "; ".join(f"{k}: {why}" for k, why in sorted(refused.items())[:5])
    raise ValueError(f"{folder / PEFT_WEIGHTS} holds {len(refused)} tensor(s) mos_jax cannot read as LoRA factors: "
                     f"{shown}{' ...' if len(refused) > 5 else ''}.")
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    if not key.startswith(prefix):
      raise ValueError(f"{folder / PEFT_WEIGHTS}: key {key!r} lacks the prefix {prefix!r}; pass prefix=.")
    module, factor, _ = key[len(prefix):].rsplit(".", 2)
    factors.setdefault(module, {})[factor] = value
  try:
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    out = {}
    for module, ab in sorted(factors.items()):
      if set(ab) != {"lora_A", "lora_B"}:
        raise ValueError(f"module {module!r} has {sorted(ab)}, not lora_A and lora_B")
      a, b = ab["lora_A"], ab["lora_B"]
      r_m, alpha_m = _pattern_value(ranks, module, r), _pattern_value(alphas, module, alpha)
      if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r_m or b.shape[1] != r_m:
        raise ValueError(f"module {module!r} has lora_A {a.shape} and lora_B {b.shape}, but the config gives it "
                         f"rank {r_m} (2-D (r, d_in) and (d_out, r) expected)")
      scale = alpha_m / math.sqrt(r_m) if config.get("use_rslora") else alpha_m / r_m
      out[module.replace(".", "/")] = PeftModule(a, b, float(scale))
  except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
    raise CorruptError(f"{folder} is not a consistent PEFT LoRA folder: {e}") from e
  if not out:
    raise CorruptError(f"{folder / PEFT_WEIGHTS} holds no LoRA factors (no lora_A/lora_B tensors).")
  return out


def load_peft_factors(folder: str | Path, *, prefix: str = PEFT_PREFIX,
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
  """Reads a PEFT LoRA folder back into Flax-path factors and their one scale.

  :func:`load_peft` with every module's scale equal (rsLoRA included); use
  :func:`load_peft` when ``rank_pattern``/``alpha_pattern`` give modules
  different scales.

  Args:
    folder: a folder written by :func:`export_peft` (or by PEFT).
    prefix: the key prefix to strip.

  Returns:
    ``({flax module path: (A (r, d_in), B (d_out, r))}, scale)``, ``scale`` being
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).

  Raises:
    ValueError: modules have different scales (rank or alpha patterns), or
      anything :func:`load_peft` refuses.
    CorruptError: the folder's files differ from its manifest, or cannot be read.

  Example:
    >>> factors, scale = load_peft_factors("out/peft")  # doctest: +SKIP
    >>> a, b = factors["model/layers/0/self_attn/q_proj"]  # doctest: +SKIP
    >>> dw = mos_jax.core.delta_weight(jnp.asarray(a), jnp.asarray(b), scale)  # doctest: +SKIP
  """
  modules = load_peft(folder, prefix=prefix)
  scales = {m.scale for m in modules.values()}
  if len(scales) > 1:
    shown = ", ".join(f"{p}: {m.scale:g}" for p, m in list(modules.items())[:4])
    raise ValueError(f"{folder}: rank_pattern/alpha_pattern give the modules {len(scales)} different scales "
                     f"({shown} ...), which one scale cannot express: read them with "
                     "mos_jax.formats.load_peft, which returns each module's scale.")
  return {p: (m.a, m.b) for p, m in modules.items()}, scales.pop()
