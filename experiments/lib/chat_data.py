"""Instruction data for causal LMs: JSONL/Parquet rows, the model's chat template, response-masked fixed-shape batches.

A row is either ``{"prompt": ..., "response": ...}`` (optionally ``"system"``)
or ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``.
It is rendered with the model's own chat template (the tokenizer's, from the
model folder) and tokenized; only assistant turns are scored. Each turn is
tokenized on its own between the template's boundaries, so the scored tokens
are exactly the assistant's content and the template's end-of-turn marks.

Batches have one fixed shape (one compiled step): ``tokens``, ``positions``,
``segments`` (0 = padding; with packing, one id per example), ``targets`` (the
next token) and ``weights`` (1 where the target is a scored token), all
``(rows, seq_len)``. Examples longer than ``seq_len + 1`` tokens are cut.

Order: global row ``g`` of step ``s`` takes the examples at positions
``((s - 1) * global_batch + g) * pack + j`` of a stream that visits the
training rows in a fresh seeded permutation each epoch (as grain's index
sampler does). Any process can make any row from ``(seed, step, row)`` alone,
so each process reads and tokenizes only the rows its devices hold, and a
resumed run's data position is its step.
"""

from __future__ import annotations

import functools
import json
import mmap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mos_jax.formats import atomic_file

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("tokens", "positions", "segments", "targets", "weights")
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------
# Rows.


def local_copy(path: str, cache_dir: Path) -> Path:
  """``path`` itself if local, else a copy of a ``gs://`` object in ``cache_dir``, made atomically.

  The copy is named after the object's size and modification time, so an object replaced in the bucket is
  fetched again, never read stale from the cache.
  """
  if "://" not in path:
    if not Path(path).is_file():
      raise FileNotFoundError(f"Data file {path} does not exist.")
    return Path(path)
  from etils import epath  # noqa: PLC0415
  remote = epath.Path(path)
  if not remote.exists():
    raise FileNotFoundError(f"Data file {path} does not exist (or this machine may not read it).")
  stat = remote.stat()
  target = cache_dir / "data" / path.split("://", 1)[1]
  local = target.with_name(f"{target.stem}.{stat.length}-{int(stat.mtime * 1000)}{target.suffix}")
  if not local.is_file():
    atomic_file(local, lambda tmp: Path(tmp).write_bytes(remote.read_bytes()))
  return local


class Records:
  """Random access to the rows of a JSONL (one JSON object per line) or Parquet file.

  A JSONL file is indexed by its line offsets (one pass over the bytes, nothing
  parsed); a row is parsed when it is asked for. Parquet needs pyarrow.

  Args:
    path: ``.jsonl``/``.json`` or ``.parquet``; local or ``gs://``.
    cache_dir: where a ``gs://`` file is copied.
  """

  def __init__(self, path: str, cache_dir: str | Path = ".cache"):
    self.path = path
    local = local_copy(str(path), Path(cache_dir))
    self._frame = None
    if local.suffix == ".parquet":
      try:
        import pandas as pd  # noqa: PLC0415
        self._frame = pd.read_parquet(local)
      except ImportError as e:
        raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow ({e}); or convert it to JSONL.") from e
      self._n = len(self._frame)
      return
    self._file = open(local, "rb")  # noqa: SIM115  (kept open: rows are read on demand)
    size = local.stat().st_size
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    ends = np.flatnonzero(np.frombuffer(self._map, np.uint8) == ord("\n")) if size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [size]])
    keep = ends > starts  # blank lines (and the empty tail after a final newline) are not rows
    self._starts, self._ends = starts[keep], ends[keep]
    self._n = len(self._starts)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < self._n:
      raise IndexError(f"row {i} of {self._n}")
    if self._frame is not None:
      return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in self._frame.iloc[int(i)].items()}
    raw = bytes(self._map[self._starts[i]:self._ends[i]])
    try:
      row = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.path}: row {i} is not JSON ({e}): {raw[:120]!r}") from e
    if not isinstance(row, dict):
      raise ValueError(f"{self.path}: row {i} is a {type(row).__name__}, not a JSON object.")
    return row


def messages_of(row: Mapping[str, Any], where: str = "row") -> list[dict[str, str]]:
  """The chat messages of a row (``messages``, or ``prompt``/``response`` with an optional ``system``).

  Raises:
    ValueError: neither form, an unknown role, or no assistant turn (named, with the keys found).
  """
  if "messages" in row:
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
  elif "prompt" in row and "response" in row:
    messages = ([{"role": "system", "content": str(row["system"])}] if row.get("system") else []) + [
        {"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["response"])}]
  else:
    raise ValueError(f"{where}: expected 'messages' or 'prompt' and 'response', found keys {sorted(row)}.")
  bad = sorted({m["role"] for m in messages} - set(ROLES))
  if bad:
    raise ValueError(f"{where}: roles {bad} are not {ROLES}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no assistant message: nothing to train on.")
  return messages


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                where: str = "row") -> tuple[list[int], list[int]]:
  """Token ids of a conversation in the tokenizer's chat template, and 1 on the assistant turns' tokens.

  The template is rendered up to each assistant turn (with the generation
  prompt) and through it; each span is tokenized on its own, so the mask is
  exact.

  Raises:
    ValueError: the template renders a conversation's start differently once
      more turns follow (then spans cannot be cut); the message says which turn.
  """
  def render(upto: int, prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages[:upto]), tokenize=False, add_generation_prompt=prompt)

  cuts, spans = [0], []
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      spans.append((render(i, True), render(i + 1, False)))
  full = render(len(messages), False)
  previous = ""
  for before, through in spans:
    if not (before.startswith(previous) and through.startswith(before) and full.startswith(through)):
      raise ValueError(f"{where}: the chat template does not render this conversation prefix by prefix, so the "
                       "assistant tokens cannot be told apart. Use a template without history-dependent "
                       "rewriting (e.g. one that does not strip earlier reasoning).")
    cuts += [len(before), len(through)]
    previous = through
  cuts.append(len(full))
  ids: list[int] = []
  mask: list[int] = []
  for k in range(len(cuts) - 1):
    text = full[cuts[k]:cuts[k + 1]]
    if not text:
      continue
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += piece
    mask += [k % 2] * len(piece)  # spans alternate: prompt, response, prompt, ...
  return ids, mask


# ----------------------------------------------------------------------------------------------
# Fixed-shape rows and batches.


def pack_row(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int) -> Batch:
  """One row of ``seq_len`` positions from examples placed one after another (each cut to what is left).

  Example ``j`` gets segment ``j + 1`` and positions from 0; its targets are
  its own next tokens (never the next example's first).
  """
  row = {"tokens": np.full(seq_len, pad_id, np.int32), "positions": np.zeros(seq_len, np.int32),
         "segments": np.zeros(seq_len, np.int32), "targets": np.full(seq_len, pad_id, np.int32),
         "weights": np.zeros(seq_len, np.float32)}
  at = 0
  for j, (ids, mask) in enumerate(examples):
    n = min(len(ids), seq_len - at)
    if n <= 0:
      break
    span = slice(at, at + n)
    row["tokens"][span] = ids[:n]
    row["positions"][span] = np.arange(n)
    row["segments"][span] = j + 1
    # Position t predicts token t + 1 of the same example; the last token predicts nothing.
    row["targets"][at:at + n - 1] = ids[1:n]
    row["weights"][at:at + n - 1] = mask[1:n]
    at += n
  return row


class InstructionBatches:
  """``next_batch(step)`` of :func:`experiments.lib.loop.fit`: global batches in which each process encodes its rows.

  Args:
    records: the rows (:class:`Records` or a list of dicts).
    indices: which rows are training rows.
    tokenizer: the model's tokenizer (``apply_chat_template``, ``__call__``).
    seq_len: positions per row.
    global_batch: rows per step (all processes together).
    seed: the order's seed.
    pack: examples per row (1: one padded example per row).
    sharding: the batch sharding; ``None`` returns NumPy batches (one process).
    pad_id: the padding token (default the tokenizer's, else its eos).
    ordered: visit ``indices`` once, in order (held-out sets); rows past the end are empty (weight 0).

  Example:
    >>> rows = Records("train.jsonl")  # doctest: +SKIP
    >>> batches = InstructionBatches(rows, range(len(rows)), tok, seq_len=512, global_batch=32, seed=0)  # doctest: +SKIP
    >>> batch, examples = batches(1)  # doctest: +SKIP
  """

  SAMPLER = "epoch-permutation/1"

  def __init__(self, records: Sequence[Mapping[str, Any]], indices: Sequence[int], tokenizer: Any, *,
               seq_len: int, global_batch: int, seed: int, pack: int = 1, sharding: Any = None,
               pad_id: int | None = None, ordered: bool = False):
    if pack < 1 or seq_len < 2 or global_batch < 1:
      raise ValueError(f"pack ({pack}), global_batch ({global_batch}) must be >= 1 and seq_len ({seq_len}) >= 2.")
    self.records, self.indices = records, np.asarray(indices, np.int64)
    if not len(self.indices):
      raise ValueError("No training rows.")
    self.tokenizer, self.seq_len, self.global_batch = tokenizer, seq_len, global_batch
    self.seed, self.pack, self.sharding, self.ordered = seed, pack, sharding, ordered
    self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                      else tokenizer.eos_token_id)
    self.encoded = functools.lru_cache(maxsize=4096)(self._encode)

  def _encode(self, i: int) -> tuple[list[int], list[int]]:
    where = f"{getattr(self.records, 'path', 'data')} row {i}"
    return encode_chat(self.tokenizer, messages_of(self.records[i], where), where)

  @functools.lru_cache(maxsize=8)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))

  def example(self, position: int) -> int | None:
    """The row index at a position of the example stream (``None``: past the end of an ordered set)."""
    n = len(self.indices)
    if self.ordered:
      return int(self.indices[position]) if position < n else None
    return int(self.indices[self._order(position // n)[position % n]])

  def rows(self, step: int, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of step ``step``'s global batch, as NumPy arrays."""
    out = []
    for g in range(start, stop):
      first = ((step - 1) * self.global_batch + g) * self.pack
      found = (self.example(first + j) for j in range(self.pack))
      out.append(pack_row([self.encoded(i) for i in found if i is not None], self.seq_len, self.pad_id))
    return {k: np.stack([r[k] for r in out]) for k in BATCH_KEYS}

  def __call__(self, step: int) -> tuple[Any, int]:
    shape = (self.global_batch, self.seq_len)
    if self.sharding is None:
      return self.rows(step, 0, self.global_batch), self.global_batch * self.pack
    from mos_jax import parallel  # noqa: PLC0415
    made: dict[tuple[int, int], Batch] = {}

    def load(key: str) -> Callable[[int, int], np.ndarray]:
      def rows(a: int, b: int) -> np.ndarray:
        if (a, b) not in made:
          made[(a, b)] = self.rows(step, a, b)
        return made[(a, b)][key]
      return rows

    return {k: parallel.global_batch(self.sharding, shape, load(k)) for k in BATCH_KEYS}, \
        self.global_batch * self.pack

  def get_state(self) -> dict[str, Any]:
    """What the order depends on (the position is the step, stored by the checkpoint)."""
    return {"sampler": "ordered" if self.ordered else self.SAMPLER, "seed": self.seed, "rows": len(self.indices),
            "global_batch": self.global_batch,
            "pack": self.pack, "seq_len": self.seq_len}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Checks that a checkpoint's data order is this one's (nothing to move: rows follow from the step).

    Raises:
      ValueError: the data or its order changed since the checkpoint (named).
    """
    live = self.get_state()
    diffs = [f"{k}: checkpoint {state.get(k)!r}, now {v!r}" for k, v in live.items() if state.get(k) != v]
    if diffs:
      raise ValueError("The training data differ from the checkpoint's, so the resumed run would not see the "
                       f"examples the interrupted one would have: {'; '.join(diffs)}. Resume with the same data "
                       "and settings, or start a new run folder.")


def split(n: int, *, eval_fraction: float, eval_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train, held_out)`` row indices: a seeded ``eval_fraction`` of the rows (at most ``eval_max``) held out."""
  order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
  k = min(int(round(n * eval_fraction)), eval_max) if eval_fraction > 0 else 0
  if k >= n:
    raise ValueError(f"eval_fraction={eval_fraction} of {n} rows leaves nothing to train on.")
  return np.sort(order[k:]), np.sort(order[:k])
