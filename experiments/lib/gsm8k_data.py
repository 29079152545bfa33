"""GSM8K: JSONL files, HF ``datasets``, generated problems in its format, and exact-match scoring.

A row is ``{"question", "answer"}`` and the answer ends in ``#### N``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Pair = tuple[str, str]


def final_number(text: str) -> str | None:
  """The number after the last ``####`` (else the last number in the text), normalised.

  Commas and a trailing ``.0`` are dropped so ``1,000`` == ``1000`` == ``1000.0``.
  """
  tail = text.rsplit("####", 1)[1] if "####" in text else text
  found = _NUMBER.findall(tail) if "####" in text else _NUMBER.findall(text)[-1:]
  if not found:
    return None
  value = found[0].replace(",", "")
  return value[:-2] if value.endswith(".0") else value


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions whose final number equals the reference's."""
  hits = [final_number(p) is not None and final_number(p) == final_number(r)
          for p, r in zip(predictions, references, strict=True)]
  return float(np.mean(hits)) if hits else 0.0


def load_jsonl(path: Path) -> list[Pair]:
  """GSM8K rows as (question, answer); clear errors for missing/empty/malformed files."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file. Point --data-dir at a folder with train.jsonl and test.jsonl.")
  pairs = []
  for lineno, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not JSON ({e}).") from e
    if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
      raise ValueError(f"{path}:{lineno}: expected keys 'question' and 'answer', got "
                       f"{sorted(row) if isinstance(row, dict) else type(row).__name__}.")
    if final_number(row["answer"]) is None or "####" not in row["answer"]:
      raise ValueError(f"{path}:{lineno}: the answer has no final '#### <number>'.")
    pairs.append((row["question"].strip(), row["answer"].strip()))
  if not pairs:
    raise ValueError(f"{path}: empty file, no examples.")
  return pairs


def generate_problems(seed: int, n: int) -> list[Pair]:
  """Arithmetic word problems in GSM8K's format, for machines without the data set."""
  rng = np.random.default_rng(seed)
  names, items = ["Ann", "Ben", "Carla", "Dev", "Eli", "Fay"], ["apples", "books", "coins", "pens", "shells"]
  pairs = []
  for _ in range(n):
    name, item = rng.choice(names), rng.choice(items)
    a, b = int(rng.integers(2, 20)), int(rng.integers(1, 10))
    if rng.random() < 0.5:
      q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
      ans = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"
    else:
      a = a + b
      q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
      ans = f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left.\n#### {a - b}"
    pairs.append((q, ans))
  return pairs


def get_data(data_dir: str | None, *, allow_network: bool, seed: int) -> tuple[list[Pair], list[Pair], str]:
  """``(train, test, source)`` from ``data_dir``'s train/test.jsonl, else HF ``openai/gsm8k`` (with network), else generated."""
  if data_dir:
    d = Path(data_dir)
    return load_jsonl(d / "train.jsonl"), load_jsonl(d / "test.jsonl"), f"jsonl:{d}"
  if allow_network:
    try:
      from datasets import load_dataset
      ds = load_dataset("openai/gsm8k", "main")
      as_pairs = lambda split: [(r["question"], r["answer"]) for r in ds[split]]
      return as_pairs("train"), as_pairs("test"), "hf:openai/gsm8k"
    except Exception as e:  # no package, no network: fall through to generated data
      print(f"HF datasets unavailable ({type(e).__name__}); using generated problems.")
  return generate_problems(seed, 2000), generate_problems(seed + 1, 200), f"generated:seed={seed}"
