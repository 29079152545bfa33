"""Tunix NNX models (Gemma 3, Llama 3.x, Qwen 3) from Hugging Face safetensors folders, sharded as they load.

A model folder is what the hub holds: ``config.json``, ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, and
the tokenizer files. Only safetensors are read (never ``.bin``, never torch).

:func:`load_model` builds the model's structure with ``nnx.eval_shape`` (no
weights), gives every parameter the sharding of Tunix's own annotations
(translated to the ``data``/``fsdp``/``tensor`` axes of
:func:`mos_jax.parallel.make_mesh`), and creates each parameter with
``jax.make_array_from_callback``: each process reads, for each of its devices,
only the slice that device holds (``safetensors.safe_open(...).get_slice``),
casts that slice to the parameter dtype (bfloat16 by default) and places it. No
process ever holds a whole tensor it does not need, or a float32 copy of the
model. The HF-name -> Tunix-path mapping and its transposes/reshapes are
Tunix's own (``tunix.models.<family>.params[_safetensors]``); Tunix's loader
itself reads every tensor whole on every host (and casts it whole), which is
why the slices are read here.

``--model`` sources: a local folder; ``gs://BUCKET/PATH`` (the model's files
are copied once to ``$MOS_CACHE_DIR/models/...`` on each host, safetensors and
tokenizer files only); ``hf://ORG/NAME`` (``huggingface_hub.snapshot_download``
of the same files).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mos_jax.formats import atomic_file
from experiments.lib import tunix_rope

#: The files of a model folder that are fetched and read: weights as safetensors only.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "chat_template.json", "tokenizer.model")

#: Chat templates for folders whose tokenizer_config.json has none (base models), in the families' own format.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def default_cache_dir() -> Path:
  """``$MOS_CACHE_DIR/models`` if set, else ``~/.cache/mos_jax/models``."""
  root = os.environ.get("MOS_CACHE_DIR")
  return (Path(root) if root else Path.home() / ".cache" / "mos_jax") / "models"


# ----------------------------------------------------------------------------------------------
# Sources: local folders, gs:// and hf://.


def _wanted(name: str) -> bool:
  return any(Path(name).match(pattern) for pattern in MODEL_FILES)


def local_model_dir(source: str, cache_dir: str | Path | None = None) -> Path:
  """The local folder of a model source, fetching ``gs://`` and ``hf://`` sources once (safetensors only).

  Args:
    source: a local folder, ``gs://BUCKET/PATH`` or ``hf://ORG/NAME``.
    cache_dir: where fetched models go (default :func:`default_cache_dir`).

  Returns:
    A folder holding ``config.json``, the safetensors and the tokenizer files.

  Raises:
    FileNotFoundError: a local folder that does not exist.
  """
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  if source.startswith("hf://"):
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    return Path(snapshot_download(source.removeprefix("hf://"), allow_patterns=list(MODEL_FILES),
                                  cache_dir=str(cache / "hf")))
  if source.startswith("gs://"):
    from etils import epath  # noqa: PLC0415
    remote = epath.Path(source)
    local = cache / "gs" / source.removeprefix("gs://").strip("/")
    wanted = sorted((p for p in remote.iterdir() if _wanted(p.name)), key=lambda p: p.name)
    if not wanted:
      raise FileNotFoundError(f"No config.json or *.safetensors in {source}.")
    # The listing (names and sizes) marks a complete copy: a folder changed in the bucket is fetched again.
    listing = json.dumps([[p.name, p.stat().length] for p in wanted])
    marker = local / ".complete"
    if marker.is_file() and marker.read_text() == listing:
      return local
    local.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for item in wanted:
      # Each file lands whole or not at all: a killed copy leaves no half file to trust later.
      atomic_file(local / item.name, lambda tmp, item=item: Path(tmp).write_bytes(item.read_bytes()))
    marker.write_text(listing)
    return local
  folder = Path(source).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"Model folder {source} does not exist: pass a folder with config.json and "
                            "*.safetensors, gs://BUCKET/PATH or hf://ORG/NAME.")
  return folder


# ----------------------------------------------------------------------------------------------
# The safetensors files of a folder, read slice by slice.


class SafetensorsReader:
  """The tensors of a folder's safetensors files, read by slice through memory maps.

  Args:
    folder: the model folder (one ``*.safetensors`` file, or several with
      ``model.safetensors.index.json``).

  Raises:
    FileNotFoundError: no safetensors in the folder (a ``.bin`` folder names the fix).
  """

  def __init__(self, folder: str | Path):
    from safetensors import safe_open  # noqa: PLC0415

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
      files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
      other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
      hint = (f" It holds {other[:3]}: PyTorch pickles are not read (they need torch and can run code). "
              "Convert them once with transformers' save_pretrained(safe_serialization=True), or download "
              "the safetensors variant." if other else "")
      raise FileNotFoundError(f"No *.safetensors in {folder}.{hint}")
    self._handles = {name: safe_open(str(folder / name), framework="numpy") for name in files}
    self._where: dict[str, str] = {}
    for name, handle in self._handles.items():
      for key in handle.keys():
        self._where[key] = name
    self.bytes_read = 0
    self.largest_read = 0

  def keys(self) -> list[str]:
    return sorted(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` (plain slices, one per dimension), reading only those bytes."""
    out = self._handles[self._where[key]].get_slice(key)[index]
    self.bytes_read += out.nbytes
    self.largest_read = max(self.largest_read, out.nbytes)
    return out


# ----------------------------------------------------------------------------------------------
# Recipes: how one Tunix parameter is made from HF tensors (Tunix's transposes and reshapes).


def _groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Pairs of (source dims, reshaped dims) with equal products, in order (a reshape's dim groups)."""
  groups, i, j = [], 0, 0
  while i < len(src) or j < len(dst):
    gi, gj = [i], [j]
    a, b = src[i], dst[j]
    i, j = i + 1, j + 1
    while a != b:
      if a < b:
        a *= src[i]; gi.append(i); i += 1  # noqa: E702
      else:
        b *= dst[j]; gj.append(j); j += 1  # noqa: E702
    while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
      gj.append(j); j += 1  # noqa: E702
    groups.append((gi, gj))
  return groups


@dataclasses.dataclass(frozen=True)
class Piece:
  """A Tunix parameter (or one member of a stack) as ``transpose(reshape(transpose(hf, permute), reshape), post)``."""

  source: str
  source_shape: tuple[int, ...]
  permute: tuple[int, ...] | None = None
  reshape: tuple[int, ...] | None = None
  post: tuple[int, ...] | None = None

  @property
  def _permuted(self) -> tuple[int, ...]:
    return tuple(self.source_shape[d] for d in self.permute) if self.permute else self.source_shape

  @property
  def _reshaped(self) -> tuple[int, ...]:
    return tuple(self.reshape) if self.reshape else self._permuted

  @property
  def shape(self) -> tuple[int, ...]:
    mid = self._reshaped
    return tuple(mid[d] for d in self.post) if self.post else mid

  def read(self, reader: SafetensorsReader, index: tuple[slice, ...]) -> np.ndarray:
    """The parameter's ``[index]`` block, reading only the source elements it needs."""
    mid_index = [slice(None)] * len(self._reshaped)
    for j, s in enumerate(index):
      mid_index[self.post[j] if self.post else j] = s
    permuted, reshaped = self._permuted, self._reshaped
    perm_index: list[slice] = [slice(None)] * len(permuted)
    splits = []  # (perm dim, sub-shapes, flat offsets into the covering range)
    for gi, gj in _groups(permuted, reshaped):
      if len(gi) == 1 and len(gj) == 1:
        perm_index[gi[0]] = mid_index[gj[0]]
        continue
      if len(gi) != 1:
        raise NotImplementedError(f"{self.source}: a reshape that merges dims {gi} is not supported by the "
                                  "sliced reader.")
      subs = [range(*mid_index[d].indices(reshaped[d])) for d in gj]
      flat = np.ravel_multi_index(np.ix_(*subs), [reshaped[d] for d in gj]).ravel()
      lo, hi = int(flat.min()), int(flat.max()) + 1
      perm_index[gi[0]] = slice(lo, hi)
      splits.append((gi[0], [len(s) for s in subs], flat - lo))
    src_index = [slice(None)] * len(self.source_shape)
    for j, s in enumerate(perm_index):
      src_index[self.permute[j] if self.permute else j] = s
    block = reader.read(self.source, tuple(src_index))
    if self.permute:
      block = block.transpose(self.permute)
    for dim, sub_shape, offsets in sorted(splits, reverse=True):  # last dim first: earlier dims keep their place
      if len(offsets) != block.shape[dim]:
        block = np.take(block, offsets, axis=dim)
      block = block.reshape(block.shape[:dim] + tuple(sub_shape) + block.shape[dim + 1:])
    return block.transpose(self.post) if self.post else block


@dataclasses.dataclass(frozen=True)
class Stack:
  """A Tunix parameter stacked from several pieces along a new leading axis (Gemma's ``kv_einsum``)."""

  pieces: tuple[Piece, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.pieces), *self.pieces[0].shape)

  def read(self, reader: SafetensorsReader, index: tuple[slice, ...]) -> np.ndarray:
    chosen = self.pieces[index[0]]
    return np.stack([p.read(reader, tuple(index[1:])) for p in chosen])


# ----------------------------------------------------------------------------------------------
# Families.


@dataclasses.dataclass(frozen=True)
class Family:
  """One Tunix model family: its module, how HF's config.json maps onto its ModelConfig, its MoS targets.

  Attributes:
    name: ``gemma3``, ``llama3`` or ``qwen3``.
    model_types: HF ``model_type`` values of the family.
    module: Tunix's model module (``tunix.models.gemma3.model``).
    params_module: Tunix's module with ``_get_key_and_transform_mapping``.
    model_class: the NNX class in ``module``.
    targets: the attention and MLP projections MoS adapts by default.
    chat_template: used when the folder's tokenizer has none.
  """

  name: str
  model_types: tuple[str, ...]
  module: str
  params_module: str
  model_class: str
  targets: tuple[str, ...]
  chat_template: str

  def tunix(self) -> Any:
    return importlib.import_module(self.module)

  def key_mapping(self, cfg: Any) -> dict[str, tuple[str, Any]]:
    return importlib.import_module(self.params_module)._get_key_and_transform_mapping(cfg)


FAMILIES = {
    "gemma3": Family("gemma3", ("gemma3", "gemma3_text"), "tunix.models.gemma3.model",
                     "tunix.models.gemma3.params_safetensors", "Gemma3",
                     ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"),
                     GEMMA_TEMPLATE),
    "llama3": Family("llama3", ("llama",), "tunix.models.llama3.model", "tunix.models.llama3.params", "Llama3",
                     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), LLAMA3_TEMPLATE),
    "qwen3": Family("qwen3", ("qwen3",), "tunix.models.qwen3.model", "tunix.models.qwen3.params", "Qwen3",
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), QWEN_TEMPLATE),
}
REMAT = ("none", "block", "decoder")


def family_targets(family: Family, cfg: Any) -> tuple[str, ...]:
  """The family's attention and MLP projections present in this model (Gemma fuses q/k/v at equal head counts)."""
  if family.name != "gemma3":
    return family.targets
  drop = {"q_einsum", "kv_einsum"} if cfg.num_heads == cfg.num_kv_heads else {"qkv_einsum"}
  return tuple(t for t in family.targets if t not in drop)


def read_config(folder: str | Path) -> dict[str, Any]:
  """``config.json`` of a model folder; a multimodal Gemma 3's ``text_config`` is taken as the model's."""
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"No config.json in {folder}: a Hugging Face model folder has one.")
  cfg = json.loads(path.read_text())
  if "text_config" in cfg:  # Gemma3ForConditionalGeneration: the language model is what is trained
    cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
    cfg.setdefault("model_type", "gemma3_text")
  return cfg


def family_of(hf: Mapping[str, Any]) -> Family:
  """The family of a config.json.

  Raises:
    ValueError: a model type outside the supported families, or a mixture-of-experts Qwen 3.
  """
  kind = hf.get("model_type")
  for family in FAMILIES.values():
    if kind in family.model_types:
      return family
  raise ValueError(f"model_type {kind!r} is not supported: the families are "
                   f"{sorted(t for f in FAMILIES.values() for t in f.model_types)} (Gemma 3, Llama 3.x, dense Qwen 3).")


def _axes(value: Any, activation: bool) -> Any:
  """Tunix's mesh axis names ('fsdp', 'tp') -> ours ('fsdp', 'tensor'; activations' batch over data x fsdp)."""
  if not isinstance(value, tuple):
    return value
  out = []
  for a in value:
    if a == "tp":
      out.append("tensor")
    elif a == "fsdp" and activation:
      out.append(("data", "fsdp"))
    else:
      out.append(a)
  return tuple(out)


def sharding_config(family: Family) -> Any:
  """Tunix's default training ShardingConfig of the family, on this project's mesh axes."""
  shd = family.tunix().ShardingConfig.get_default_sharding()
  return dataclasses.replace(shd, **{f.name: _axes(getattr(shd, f.name), f.name.startswith("act_"))
                                     for f in dataclasses.fields(shd)})


def tunix_config(hf: Mapping[str, Any], family: Family, *, dtype: Any = jnp.bfloat16, remat: str = "none") -> Any:
  """Tunix's ModelConfig of the family for a config.json.

  Raises:
    ValueError: a field Tunix's model cannot honour (named, with the value).
  """
  mod = family.tunix()
  if remat not in REMAT:
    raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
  common = dict(shd_config=sharding_config(family), remat_config=getattr(mod.RematConfig, remat.upper()))
  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or hidden // heads
  scaling = hf.get("rope_scaling") or {}
  if family.name == "gemma3":
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
      raise ValueError(f"rope_scaling {scaling}: Tunix's Gemma 3 implements linear scaling only.")
    qpas = hf.get("query_pre_attn_scalar", head_dim)
    norm = mod.QueryPreAttentionNormalisation
    if qpas == head_dim:
      query_norm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
    elif qpas == hidden // heads:
      query_norm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    else:
      raise ValueError(f"query_pre_attn_scalar={qpas} is neither head_dim ({head_dim}) nor hidden_size/heads "
                       f"({hidden // heads}): Tunix's Gemma 3 supports only those two.")
    for key, want in (("attn_logit_softcapping", None), ("final_logit_softcapping", None)):
      if hf.get(key) != want:
        raise ValueError(f"{key}={hf.get(key)}: Tunix's Gemma 3 has no softcapping (Gemma 3 checkpoints use None).")
    return mod.ModelConfig(
        num_layers=hf["num_hidden_layers"], num_embed=hf["vocab_size"], embed_dim=hidden,
        hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=head_dim,
        num_kv_heads=hf["num_key_value_heads"], sliding_window_size=hf.get("sliding_window", 4096),
        local_base_frequency=int(hf.get("rope_local_base_freq", 10_000)),
        global_base_frequency=int(hf.get("rope_theta", 1_000_000)),
        global_scale_factor=float(scaling.get("factor", 1.0)), query_pre_attn_norm=query_norm,
        param_dtype=dtype, **common)
  # Tunix 0.1.7's Llama 3 / Qwen 3 ignore rope_theta and rope_scaling: the config records both, and
  # hidden_states rotates with them (tunix_rope).
  if scaling:
    tunix_rope.inverse_frequencies(head_dim, float(hf.get("rope_theta", 10_000)), scaling)  # refuses other types
  config_cls = tunix_rope.config_class(family.name)
  fields = dict(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hidden,
                hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=head_dim,
                num_kv_heads=hf.get("num_key_value_heads", heads), rope_theta=int(hf.get("rope_theta", 10_000)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **common)
  fields["rope_scaling"] = tuple(sorted(scaling.items()))
  if family.name == "llama3":
    return config_cls(weight_tying=bool(hf.get("tie_word_embeddings", False)), **fields)
  if hf.get("num_experts"):
    raise ValueError("Mixture-of-experts Qwen 3 is not supported: use a dense Qwen 3.")
  return config_cls(use_tied_embedding=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype,
                    **fields)


def recipes(family: Family, cfg: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Any], list[str]]:
  """``({Tunix parameter path: Piece or Stack}, [HF tensors not used])`` from Tunix's name mapping.

  Args:
    family: the family.
    cfg: Tunix's ModelConfig.
    shapes: ``{HF tensor name: shape}`` of the folder.
  """
  from tunix.utils.torch_utils import torch_key_to_jax_key  # noqa: PLC0415

  mapping = family.key_mapping(cfg)
  out: dict[str, Any] = {}
  pending: dict[str, dict[str, Piece]] = {}  # Gemma 3's q, k, v: fused into q_einsum/kv_einsum below
  unused = []
  for name, shape in shapes.items():
    try:
      key, transform = torch_key_to_jax_key(mapping, name)
    except ValueError:
      unused.append(name)
      continue
    if key.startswith("unused."):
      unused.append(name)
      continue
    permute, reshape = transform if transform is not None else (None, None)
    piece = Piece(name, tuple(shape), tuple(permute) if permute else None, tuple(reshape) if reshape else None)
    found = re.fullmatch(r"tmp\.layers\.([0-9]+)\.attn\.([qkv])", key)
    if found:
      # Tunix's Gemma 3 preprocess: (D, N, H) -> (N, D, H), then k and v (and q, for equal head counts) stacked.
      pending.setdefault(found.group(1), {})[found.group(2)] = dataclasses.replace(piece, post=(1, 0, 2))
      continue
    if key in out:
      raise ValueError(f"{name} and another tensor both map to {key}.")
    out[key] = piece
  for layer, qkv in pending.items():
    prefix = f"layers.{layer}.attn"
    if set(qkv) != {"q", "k", "v"}:
      raise ValueError(f"layer {layer}: attention projections {sorted(qkv)} found, q, k and v expected.")
    if cfg.num_heads == cfg.num_kv_heads:
      out[f"{prefix}.qkv_einsum.w"] = Stack((qkv["q"], qkv["k"], qkv["v"]))
    else:
      out[f"{prefix}.q_einsum.w"] = qkv["q"]
      out[f"{prefix}.kv_einsum.w"] = Stack((qkv["k"], qkv["v"]))
  return out, unused


# ----------------------------------------------------------------------------------------------
# Loading.


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """``spec`` without the axes whose size does not divide their dim (those dims stay whole)."""
  out = []
  for d, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and shape[d] % size == 0 else None)
  return P(*out)


def path_key(path: tuple[Any, ...]) -> str:
  """``layers.0.attn.q_einsum.w``: Tunix's dotted parameter path."""
  return ".".join(str(getattr(k, "key", k)) for k in path)


def _slices(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape)) + tuple(
      slice(0, n) for n in shape[len(index):])


@dataclasses.dataclass
class Loaded:
  """A loaded model and what it was loaded from.

  Attributes:
    model: the Tunix NNX model, its parameters sharded on the mesh.
    family: its :class:`Family`.
    config: Tunix's ModelConfig.
    hf_config: the folder's config.json (the text model's for multimodal Gemma 3).
    folder: the local model folder.
    unused: HF tensors the model does not use (a vision tower, a tied head).
  """

  model: Any
  family: Family
  config: Any
  hf_config: dict[str, Any]
  folder: Path
  unused: list[str]


def abstract_model(family: Family, cfg: Any) -> Any:
  """The model with shapes only (``nnx.eval_shape``): no weights allocated."""
  cls = getattr(family.tunix(), family.model_class)
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(params=0)))


def param_shardings(abstract: Any, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """``{Tunix parameter path: NamedSharding}`` from Tunix's annotations, dims that do not divide kept whole."""
  _, state = nnx.split(abstract)
  shardings = nnx.to_pure_dict(nnx.get_named_sharding(state, mesh))
  shapes = nnx.to_pure_dict(state)
  out = {}
  for (path, sharding), (_, shape) in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                                          jax.tree_util.tree_flatten_with_path(shapes)[0]):
    out[path_key(path)] = NamedSharding(mesh, _fit_spec(sharding.spec, tuple(shape.shape), mesh))
  return out


def load_model(source: str | Path, mesh: jax.sharding.Mesh, *, dtype: Any = jnp.bfloat16, remat: str = "none",
               cache_dir: str | Path | None = None,
               reader: Callable[[Path], SafetensorsReader] = SafetensorsReader) -> Loaded:
  """A Tunix NNX model from a HF safetensors folder, each parameter created sharded on ``mesh``.

  Every process calls it (on a pod: every host) and reads only the slices of
  its own devices' shards, cast one slice at a time to ``dtype``.

  Args:
    source: a local folder, ``gs://BUCKET/PATH`` or ``hf://ORG/NAME``.
    mesh: the device mesh (``data``, ``fsdp``, ``tensor`` axes).
    dtype: the parameters' dtype.
    remat: Tunix's rematerialisation: ``none``, ``block`` or ``decoder``.
    cache_dir: where ``gs://``/``hf://`` sources are fetched.
    reader: makes the :class:`SafetensorsReader` (tests wrap it to measure reads).

  Returns:
    A :class:`Loaded`.

  Raises:
    ValueError: an unsupported family or config field, a tensor of the wrong
      shape, or parameters the folder does not provide (all named).
  """
  folder = local_model_dir(str(source), cache_dir)
  hf = read_config(folder)
  family = family_of(hf)
  cfg = tunix_config(hf, family, dtype=dtype, remat=remat)
  files = reader(folder)
  plan, unused = recipes(family, cfg, {k: files.shape(k) for k in files.keys()})
  abstract = abstract_model(family, cfg)
  graphdef, state = nnx.split(abstract)
  shapes = nnx.to_pure_dict(state)
  shardings = param_shardings(abstract, mesh)
  missing = [k for k in map(path_key, (p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0])) if k not in plan]
  if missing:
    raise ValueError(f"{folder}: no tensor for {len(missing)} parameters of {family.model_class}, e.g. "
                     f"{missing[:5]}; is it a {family.name} checkpoint of this size?")
  extra = sorted(set(plan) - {path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]})
  if extra:
    raise ValueError(f"{folder}: tensors map to {extra[:5]}, which {family.model_class} does not have.")

  def create(path: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
    key = path_key(path)
    recipe = plan[key]
    if tuple(recipe.shape) != tuple(spec.shape):
      raise ValueError(f"{key}: the checkpoint gives shape {recipe.shape}, {family.model_class} expects {spec.shape}.")
    done: dict[tuple, np.ndarray] = {}  # replicas on several local devices: read once

    def block(index: tuple[slice, ...]) -> np.ndarray:
      index = _slices(index, tuple(spec.shape))
      k = tuple((s.start, s.stop) for s in index)
      if k not in done:
        done[k] = np.asarray(recipe.read(files, index)).astype(dtype)
      return done[k]

    return jax.make_array_from_callback(tuple(spec.shape), shardings[key], block)

  values = jax.tree_util.tree_map_with_path(create, shapes)
  nnx.replace_by_pure_dict(state, values)
  return Loaded(nnx.merge(graphdef, state), family, cfg, hf, folder, unused)


# ----------------------------------------------------------------------------------------------
# Running a Tunix model (any family): hidden states, head, chunked loss.


def hidden_states(model: Any, tokens: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
  """Final-norm hidden states ``(B, T, D)`` of a Tunix Gemma 3 / Llama 3 / Qwen 3 (text, no KV cache).

  The same computation as the model's ``__call__`` up to its output head, so the
  head can be applied chunk by chunk (:func:`token_nll`). Works on adapted
  models (``mos_jax.nnx.adapt`` wraps projections, not layers).
  """
  # Tunix's models broadcast implicitly; its Llama 3 / Qwen 3 need the checkpoint's RoPE (tunix_rope).
  with jax.numpy_rank_promotion("allow"), tunix_rope.using(model.config):
    x = model.embedder.encode(tokens)
    for layer in model.layers:
      _, x = layer(x, positions, None, mask)
    return model.final_norm(x)


def logits_of(model: Any, h: jax.Array) -> jax.Array:
  """The output head (tied embedding or ``lm_head``) on hidden states, float32."""
  tied = getattr(model.config, "weight_tying", getattr(model.config, "use_tied_embedding", True))
  with jax.numpy_rank_promotion("allow"):
    out = model.embedder.decode(h) if tied or not hasattr(model, "lm_head") else model.lm_head(h)
  return out.astype(jnp.float32)


def token_nll(model: Any, h: jax.Array, targets: jax.Array, weights: jax.Array, *, chunk: int = 512) -> jax.Array:
  """Sum of ``weights`` x next-token NLL, the head applied ``chunk`` positions at a time.

  Each chunk's logits ``(B, chunk, vocab)`` are recomputed in the backward pass
  (``jax.checkpoint``), so a 262k-word head never holds ``(B, T, vocab)`` at once.
  """
  import optax  # noqa: PLC0415

  t = h.shape[1]
  chunk = min(chunk, t)
  if t % chunk:
    raise ValueError(f"sequence length {t} is not a multiple of the loss chunk {chunk}.")

  @jax.checkpoint
  def one(hc, tc, wc):
    return (optax.softmax_cross_entropy_with_integer_labels(logits_of(model, hc), tc) * wc).sum()

  total = jnp.float32(0)
  for s in range(0, t, chunk):
    total = total + one(h[:, s:s + chunk], targets[:, s:s + chunk], weights[:, s:s + chunk])
  return total


def attention_mask(segments: jax.Array) -> jax.Array:
  """``(B, T, T)`` causal mask within each segment (0 = padding, attends to nothing)."""
  t = segments.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segments[:, :, None] == segments[:, None, :]
  return causal[None] & same & (segments[:, None, :] > 0)


def iter_params(model: Any) -> Iterable[tuple[str, jax.Array]]:
  """``(path, array)`` of every parameter of a model (tests, memory checks)."""
  _, state = nnx.split(model)
  for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
    yield path_key(path), x
