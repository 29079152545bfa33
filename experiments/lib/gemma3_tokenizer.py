"""Gemma 3's SentencePiece tokenizer, rebuilt from the vocabulary in a Gemma 3 GGUF file's metadata.

:func:`tokenizer_proto` turns the GGUF's ``tokenizer.ggml.*`` fields into a SentencePiece
``ModelProto`` equivalent to Gemma 3's ``tokenizer.model``; :func:`cached_tokenizer` writes it
once (atomically) and loads it as a :class:`Tokenizer`. Where the GGUF and the cache folder come
from: :mod:`experiments.lib.gemma3_weights` (``load_tokenizer``, ``load_gemma3_270m``).

One GGUF convention matters (llama.cpp's ``convert_hf_to_gguf.py`` introduces it): added tokens
that are whitespace runs (``"▁▁"``, ...) are stored with ``▁`` replaced by a space. SentencePiece
escapes spaces to ``▁`` before it matches such pieces, so the replacement is undone here;
otherwise ``"a  b"`` would not use the ``▁▁`` piece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from mos_jax.formats import atomic_file


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


def tokenizer_proto(reader: Any) -> bytes:
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


def cached_tokenizer(path: str | Path, open_reader: Callable[[], Any]) -> Tokenizer:
  """The tokenizer cached at ``path``, built first from ``open_reader()`` (a ``gguf.GGUFReader``) if absent.

  The reader is opened only on a cold cache (parsing a GGUF's metadata takes seconds); the
  ``.model`` file is written atomically, so a killed build leaves no half file.

  Args:
    path: the ``.model`` file.
    open_reader: returns a reader of the GGUF whose vocabulary to use.

  Returns:
    The tokenizer.

  Example:
    >>> tok = cached_tokenizer(folder / "tokenizer-v1.model", lambda: open_gguf(gguf))  # doctest: +SKIP
  """
  from sentencepiece import SentencePieceProcessor  # noqa: PLC0415

  path = Path(path)
  if not path.is_file():
    proto = tokenizer_proto(open_reader())
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(proto))
  return Tokenizer(SentencePieceProcessor(model_file=str(path)))
