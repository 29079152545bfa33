"""Data for the sentence-classification fine-tuning experiment (SST-2 style).

Three sources, tried in this order by :func:`get_data`:

1. a folder with GLUE-style ``train.tsv`` / ``dev.tsv`` files (``label`` + text column),
2. GLUE SST-2 through the optional ``datasets`` package (only with ``allow_network=True``),
3. a synthetic compositional sentiment task made here (:func:`generate_sentiment`).

Every loader validates its input and raises :class:`DataError` (a ``ValueError``) that
names the file, the problem and the fix *before* any training starts.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments.lib.classification import Dataset

Split = tuple[list[str], np.ndarray]

#: Text column names tried in order (SST-2 ``train.tsv`` uses ``sentence``, ``dev.tsv`` ``content``).
TEXT_COLUMNS: tuple[str, ...] = ("sentence", "content", "text")


class DataError(ValueError):
  """Bad or missing experiment data; the message names the file, the problem and the fix."""


# ----------------------------------------------------------------------------- TSV loading


def _text_candidates(text_column: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(text_column, str):
    return (text_column,)
  candidates = tuple(text_column)
  if not candidates:
    raise ValueError("text_column must name at least one column")
  return candidates


def _read_lines(path: Path) -> list[str]:
  """Read ``path`` as UTF-8 and split on ``\\n`` only (CRLF tolerated; no unicode line breaks)."""
  if not path.exists():
    raise DataError(f"{path}: file not found. Fix: check the path, or pass a data_dir that "
                    "contains train.tsv and dev.tsv.")
  if not path.is_file():
    raise DataError(f"{path}: not a regular file. Fix: point at the .tsv file itself.")
  try:
    text = path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 ({e}). Fix: re-save the file as UTF-8.") from e
  lines = [line.rstrip("\r") for line in text.split("\n")]
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise DataError(f"{path}: file is empty. Fix: it needs a header line (e.g. "
                    "'label<TAB>sentence') followed by one example per line.")
  return lines


def _parse_label(raw: str, *, path: Path, lineno: int, num_classes: int) -> int:
  try:
    label = int(raw.strip())
  except ValueError:
    raise DataError(f"{path}:{lineno}: label {raw!r} is not an integer. Fix: labels must be "
                    f"integers in 0..{num_classes - 1}.") from None
  if not 0 <= label < num_classes:
    hint = f" or pass num_classes={label + 1} or more" if label >= num_classes else ""
    raise DataError(f"{path}:{lineno}: label {label} is outside the class set "
                    f"{{0..{num_classes - 1}}}. Fix: correct the label{hint}.")
  return label


def load_tsv(
    path: str | os.PathLike[str],
    *,
    text_column: str | Sequence[str] = TEXT_COLUMNS,
    label_column: str = "label",
    num_classes: int = 2,
) -> Split:
  """Load a tab-separated file with a header line into ``(texts, labels)``.

  Args:
    path: the ``.tsv`` file.
    text_column: a column name, or candidate names of which the first present is used
      (SST-2's train file calls it ``sentence``, its dev file ``content``).
    label_column: the name of the integer label column.
    num_classes: labels must lie in ``0..num_classes-1``.

  Returns:
    The texts (outer whitespace stripped) and an ``int32`` array of labels.

  Raises:
    DataError: missing/empty file, missing column, wrong field count, a label that is not
      an integer or outside the class set, or an empty text (with its line number).
  """
  path = Path(path)
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  lines = _read_lines(path)
  header = [h.strip() for h in lines[0].split("\t")]
  candidates = _text_candidates(text_column)
  text_name = next((c for c in candidates if c in header), None)
  if text_name is None or label_column not in header:
    missing = (f"label column {label_column!r}" if label_column not in header
               else f"a text column (tried {list(candidates)})")
    raise DataError(f"{path}: missing {missing}; columns found in the header: {header}. "
                    "Fix: rename the header column or pass text_column=/label_column=.")
  text_idx, label_idx = header.index(text_name), header.index(label_column)
  texts: list[str] = []
  labels: list[int] = []
  for lineno, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    if len(fields) != len(header):
      raise DataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                      f"({header}), found {len(fields)}. Fix: remove stray tabs or blank "
                      "lines from the file.")
    labels.append(_parse_label(fields[label_idx], path=path, lineno=lineno,
                               num_classes=num_classes))
    text = fields[text_idx].strip()
    if not text:
      raise DataError(f"{path}:{lineno}: empty {text_name!r}. Fix: delete the line or fill "
                      "in the text.")
    texts.append(text)
  if not texts:
    raise DataError(f"{path}: has a header but no examples. Fix: add one example per line.")
  return texts, np.asarray(labels, dtype=np.int32)


def load_sst2(data_dir: str | os.PathLike[str], *, num_classes: int = 2) -> dict[str, Split]:
  """Load ``train.tsv`` and ``dev.tsv`` from ``data_dir`` as ``dict(train=..., dev=...)``."""
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f"{data_dir}: data directory not found. Fix: pass a folder holding "
                    "train.tsv and dev.tsv, or no data_dir to use generated data.")
  return {split: load_tsv(data_dir / f"{split}.tsv", num_classes=num_classes)
          for split in ("train", "dev")}


# ----------------------------------------------------------------------------- HF datasets

_HUB_HOST = ("huggingface.co", 443)


def _network_up(timeout: float = 2.0) -> bool:
  if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
    return False
  try:
    with socket.create_connection(_HUB_HOST, timeout=timeout):
      return True
  except OSError:
    return False


def try_load_hf_sst2() -> dict[str, Split] | None:
  """GLUE SST-2 (train, validation -> dev) via ``datasets``; ``None`` if unavailable.

  Returns ``None`` quickly when ``datasets`` is not installed, when the hub cannot be
  reached within ~2 s, or when loading fails for any reason (it is an optional source).
  """
  try:
    import datasets  # noqa: PLC0415  (optional, deliberately not a dependency)
  except ImportError:
    return None
  if not _network_up():
    return None
  for name in ("nyu-mll/glue", "glue"):
    try:
      ds = datasets.load_dataset(name, "sst2")
      return {split: (list(ds[hf_split]["sentence"]),
                      np.asarray(ds[hf_split]["label"], dtype=np.int32))
              for split, hf_split in (("train", "train"), ("dev", "validation"))}
    except Exception:  # noqa: BLE001  (connection/auth/format errors: fall back)
      continue
  return None


# ----------------------------------------------------------------------------- generated data

SUBJECTS: tuple[str, ...] = (
    "the movie", "the film", "the story", "the acting", "the plot", "the music",
    "the ending", "the script", "the cast", "the dialogue", "the soundtrack", "the book",
    "the show", "the meal", "the service", "the hotel", "the game", "the concert",
    "the lead actor", "the final scene",
)
POSITIVE: tuple[str, ...] = (
    "good", "great", "wonderful", "excellent", "delightful", "brilliant", "charming",
    "enjoyable", "beautiful", "clever", "moving", "superb", "pleasant", "amazing", "lovely",
    "fantastic", "funny", "touching",
)
NEGATIVE: tuple[str, ...] = (
    "bad", "terrible", "awful", "boring", "dull", "horrible", "poor", "weak", "tedious",
    "clumsy", "disappointing", "painful", "messy", "bland", "annoying", "silly", "lifeless",
    "forgettable",
)
INTENSIFIERS: tuple[str, ...] = ("very", "extremely", "really", "truly", "incredibly", "quite")
#: Negation words; each flips the polarity of its clause.
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly")
VERBS: tuple[str, ...] = ("is", "was")
#: Sentence frames (templates) around the body; ``{body}`` is one clause or "A , but B".
TRAIN_FRAMES: tuple[str, ...] = (
    "{body} .",
    "i think {body} .",
    "honestly , {body} .",
    "in my opinion , {body} .",
    "{body} , to be honest .",
    "my friend said {body} .",
    "overall , {body} .",
    "to me , {body} .",
)
#: Held out from training: the dev split only uses these frames.
EVAL_FRAMES: tuple[str, ...] = (
    "frankly , {body} .",
    "{body} , i would say .",
    "it seems that {body} .",
    "as far as i can tell , {body} .",
)


@dataclasses.dataclass(frozen=True)
class Clause:
  """``<subject> <verb> [negation] [intensifier] <adjective>``, e.g. "the plot was not very good"."""

  subject: str
  verb: str
  adjective: str
  negation: str | None = None
  intensifier: str | None = None

  @property
  def label(self) -> int:
    """1 = positive. The adjective's polarity, flipped by a negation (intensifiers keep it)."""
    positive = self.adjective in POSITIVE
    if not positive and self.adjective not in NEGATIVE:
      raise ValueError(f"unknown adjective {self.adjective!r}")
    return int(positive != (self.negation is not None))

  def text(self) -> str:
    words = [self.subject, self.verb, self.negation, self.intensifier, self.adjective]
    return " ".join(w for w in words if w)


def compose(frame: str, clauses: Sequence[Clause]) -> tuple[str, int]:
  """Render a sentence; with two clauses ("A , but B") the clause after "but" decides."""
  if len(clauses) not in (1, 2):
    raise ValueError(f"expected 1 or 2 clauses, got {len(clauses)}")
  body = " , but ".join(c.text() for c in clauses)
  return frame.format(body=body), clauses[-1].label


def _sample_clause(rng: np.random.Generator, label: int, p_negate: float) -> Clause:
  negation = str(rng.choice(NEGATIONS)) if rng.random() < p_negate else None
  positive_adj = bool(label) != (negation is not None)
  adjective = str(rng.choice(POSITIVE if positive_adj else NEGATIVE))
  intensifier = str(rng.choice(INTENSIFIERS)) if rng.random() < 0.4 else None
  return Clause(subject=str(rng.choice(SUBJECTS)), verb=str(rng.choice(VERBS)),
                adjective=adjective, negation=negation, intensifier=intensifier)


def _sample_split(rng: np.random.Generator, n: int, frames: Sequence[str], *,
                  p_negate: float = 0.4, p_contrast: float = 0.35) -> Split:
  labels = np.arange(n, dtype=np.int32) % 2  # exactly balanced (n odd: one extra negative)
  rng.shuffle(labels)
  texts = []
  for label in labels:
    last = _sample_clause(rng, int(label), p_negate)
    clauses = [last]
    if rng.random() < p_contrast:
      # "A , but B": A usually contrasts with B, so A alone is a misleading cue.
      first_label = 1 - int(label) if rng.random() < 0.8 else int(label)
      clauses = [_sample_clause(rng, first_label, p_negate), last]
    text, got = compose(str(rng.choice(frames)), clauses)
    assert got == label
    texts.append(text)
  return texts, labels


def generate_sentiment(seed: int, n_train: int, n_eval: int) -> dict[str, Split]:
  """A synthetic compositional sentiment task (1 = positive), deterministic given ``seed``.

  Sentences combine subjects, positive/negative adjectives, intensifiers (no effect),
  negations ("not", "never", "hardly": flip the clause) and contrast ("A , but B": B
  decides), wrapped in a sentence frame. ``dev`` only uses :data:`EVAL_FRAMES`, which never
  occur in ``train`` (:data:`TRAIN_FRAMES`), so its score measures generalisation. Labels
  are balanced exactly within each split.
  """
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
  train_rng, dev_rng = (np.random.default_rng(s)
                        for s in np.random.SeedSequence(seed).spawn(2))
  return {"train": _sample_split(train_rng, n_train, TRAIN_FRAMES),
          "dev": _sample_split(dev_rng, n_eval, EVAL_FRAMES)}


# ----------------------------------------------------------------------------- entry point


def _subsample(split: Split, max_n: int | None, seed: int) -> Split:
  texts, labels = split
  if max_n is None or max_n >= len(texts):
    return split
  idx = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_n])
  return [texts[i] for i in idx], labels[idx]


def get_data(
    data_dir: str | os.PathLike[str] | None,
    *,
    seed: int,
    n_train: int,
    n_eval: int,
    max_train: int | None = None,
    allow_network: bool = False,
) -> dict[str, Any]:
  """Return ``dict(train=(texts, labels), dev=(texts, labels), source=str)``.

  Priority: ``data_dir`` (an error if given but missing or invalid) -> GLUE SST-2 via
  ``datasets`` (only if ``allow_network``) -> :func:`generate_sentiment` with ``n_train``
  and ``n_eval`` (which only apply to generated data). ``max_train`` caps the training
  split with a seeded random subset, whatever the source.
  """
  if data_dir is not None:
    splits, source = load_sst2(data_dir), f"tsv:{Path(data_dir)}"
  else:
    splits = try_load_hf_sst2() if allow_network else None
    source = "hf:glue/sst2"
    if splits is None:
      splits = generate_sentiment(seed, n_train, n_eval)
      source = f"generated:seed={seed}"
  return {"train": _subsample(splits["train"], max_train, seed), "dev": splits["dev"],
          "source": source}


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """Tokenize ``texts`` to ``int32`` arrays ``[len(texts), max_len]`` (padded, truncated)."""
  enc = tokenizer(list(texts), max_length=max_len, padding="max_length", truncation=True,
                  return_tensors="np")
  input_ids = np.asarray(enc["input_ids"], dtype=np.int32)
  out = {"input_ids": input_ids,
         "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int32)}
  token_type_ids = enc.get("token_type_ids")
  out["token_type_ids"] = (np.zeros_like(input_ids) if token_type_ids is None
                           else np.asarray(token_type_ids, dtype=np.int32))
  return out


def load_datasets(data_dir: str | os.PathLike[str] | None, tokenizer: Any, *, max_len: int, seed: int,
                  n_generated: tuple[int, int], max_train: int | None = None,
                  allow_network: bool = False) -> tuple[Dataset, Dataset, str]:
  """``(train, dev, source)``: :func:`get_data`'s splits tokenized to ``max_len`` as classification datasets.

  ``n_generated`` is (train, eval) sizes of the generated task, used only when it is the source.
  """
  splits = get_data(data_dir, seed=seed, n_train=n_generated[0], n_eval=n_generated[1], max_train=max_train,
                    allow_network=allow_network)
  encode = lambda split: Dataset(tokenize(tokenizer, split[0], max_len), split[1])
  return encode(splits["train"]), encode(splits["dev"]), splits["source"]
