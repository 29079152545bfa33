"""A fact-memorisation task where adapter capacity binds: made-up names, each with a favourite word.

Each of ``N`` names (built from syllables, so the base model knows none of them) is mapped to
one of 64 answer words, every word used equally often. The training prompt is
``"{name}'s favorite word is"``, the response the word (one token, checked against the
tokenizer). A paraphrase, ``"The word that {name} likes best is"``, is never trained on: it tells
whether the learnt association is usable knowledge or a recited string. Everything follows from
the task seed.

Example:
  >>> task = make_task(seed=0, n_facts=256, tokenizer=tokenizer)  # doctest: +SKIP
  >>> task.names[0], task.words[task.answers[0]]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from experiments.lib import instruct

TRAIN_PROMPT = "{name}'s favorite word is"
PARAPHRASE_PROMPT = "The word that {name} likes best is"
NUM_WORDS = 64

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "zan", "dra", "bel", "nor", "sil", "qua", "fen", "gar", "hil",
             "jor", "lis", "mor", "pel", "ras", "tun", "vor", "wen", "yal", "bri", "cos", "dun", "esk", "fal", "grim")

#: Answer candidates, in order; the first 64 that are one token (with a leading space) are used.
CANDIDATE_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "music", "garden", "window", "silver", "forest", "ocean", "candle",
    "mirror", "pencil", "rabbit", "castle", "bridge", "summer", "winter", "thunder", "orange", "planet", "dragon",
    "pepper", "butter", "coffee", "violet", "marble", "copper", "falcon", "harbor", "island", "jungle", "ladder",
    "meadow", "needle", "pillow", "rocket", "saddle", "tunnel", "valley", "wizard", "anchor", "basket", "camera",
    "desert", "engine", "feather", "guitar", "hammer", "jacket", "kitten", "lemon", "monkey", "napkin", "oyster",
    "parrot", "puzzle", "rainbow", "shadow", "spider", "ticket", "velvet", "wallet", "yellow", "zebra", "bottle",
    "cookie", "dolphin", "eagle", "flower", "glove", "horse", "iron", "jelly", "kettle", "lamp", "moon", "nest",
    "onion", "piano", "queen", "rose", "sugar", "table", "umbrella", "wheel", "yarn", "bread", "chair", "dance",
    "earth", "fire", "grass", "honey", "ice", "juice", "king", "light", "milk", "night", "paper", "rain", "salt",
    "tree", "water", "wind", "wood")


@dataclasses.dataclass(frozen=True)
class FactTask:
  """The generated facts.

  Attributes:
    seed: the task seed everything was drawn from.
    names: ``N`` distinct made-up names.
    words: the ``NUM_WORDS`` answer words.
    word_ids: their token ids (``" " + word`` is one token).
    answers: ``(N,)`` the index in ``words`` of each name's word.
  """

  seed: int
  names: tuple[str, ...]
  words: tuple[str, ...]
  word_ids: np.ndarray
  answers: np.ndarray

  def prompts(self, template: str) -> list[str]:
    return [template.format(name=n) for n in self.names]


def make_names(n: int, seed: int) -> tuple[str, ...]:
  """``n`` distinct capitalised names of 2 or 3 syllables, drawn from ``seed``.

  Raises:
    ValueError: ``n`` exceeds the names the syllables can make.
  """
  most = len(SYLLABLES) ** 2 + len(SYLLABLES) ** 3
  if not 0 < n <= most // 2:
    raise ValueError(f"n={n} names: need 0 < n <= {most // 2} (the syllables make {most})")
  rng = np.random.default_rng([seed, 1])
  names: dict[str, None] = {}
  while len(names) < n:
    k = int(rng.integers(2, 4))
    names["".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k)).capitalize()] = None
  return tuple(names)


def single_token_words(tokenizer: Any, candidates: Sequence[str] = CANDIDATE_WORDS,
                       count: int = NUM_WORDS) -> tuple[tuple[str, ...], np.ndarray]:
  """The first ``count`` candidates that ``tokenizer`` encodes (with a leading space) as one token.

  Returns:
    ``(words, ids)``.

  Raises:
    ValueError: fewer than ``count`` candidates are single tokens, or two share a token.
  """
  words, ids = [], []
  for w in candidates:
    tok = tokenizer.encode(" " + w, bos=False)
    if len(tok) == 1 and tok[0] not in ids:
      words.append(w)
      ids.append(tok[0])
    if len(words) == count:
      return tuple(words), np.asarray(ids, np.int32)
  raise ValueError(f"only {len(words)} of {len(candidates)} candidate words are distinct single tokens for this "
                   f"tokenizer; need {count}: add candidates to CANDIDATE_WORDS")


def make_task(seed: int, n_facts: int, tokenizer: Any) -> FactTask:
  """``n_facts`` facts drawn from ``seed``: names, and answer words balanced over the 64 words.

  Raises:
    ValueError: ``n_facts`` is not a positive multiple of 64 (each word equally often), or
      see :func:`make_names` and :func:`single_token_words`.
  """
  if n_facts <= 0 or n_facts % NUM_WORDS:
    raise ValueError(f"n_facts={n_facts} must be a positive multiple of {NUM_WORDS} (each word equally often)")
  words, word_ids = single_token_words(tokenizer)
  answers = np.random.default_rng([seed, 2]).permutation(np.arange(n_facts) % NUM_WORDS).astype(np.int32)
  return FactTask(seed=seed, names=make_names(n_facts, seed), words=words, word_ids=word_ids, answers=answers)


def encode(task: FactTask, tokenizer: Any, template: str, seq_len: int) -> instruct.Batch:
  """Every fact as an :mod:`experiments.lib.instruct` batch with the prompt ``template``; only the answer is scored.

  The response is the answer word alone (no ``<eos>``: ``<bos>`` prompt answer, padded to
  ``seq_len``), so the NLL is that of the answer token over the whole vocabulary.

  Raises:
    ValueError: a fact does not fit ``seq_len`` tokens (none is dropped silently).
  """
  prompts = task.prompts(template)
  lengths = np.asarray([len(tokenizer.encode(p)) for p in prompts])
  if lengths.max() + 1 > seq_len:
    raise ValueError(f"{int((lengths + 1 > seq_len).sum())} of {len(prompts)} facts do not fit seq_len={seq_len} "
                     f"(the longest prompt has {lengths.max()} tokens, + the answer): raise seq_len to "
                     f"{lengths.max() + 1}")
  # encode_pairs appends <eos>: encode one longer, then turn everything after the answer into padding.
  batch, _ = instruct.encode_pairs(tokenizer, prompts, [task.words[a] for a in task.answers],
                                   task.answers.tolist(), seq_len=seq_len + 1, response_len=2)
  after = np.arange(seq_len)[None, :] > batch["positions"][:, :1] + 1
  return {**batch, "tokens": np.where(after, tokenizer.pad_id, batch["tokens"][:, :seq_len]).astype(np.int32),
          "valid": batch["valid"][:, :seq_len] & ~after, "positions": batch["positions"][:, :1],
          "targets": batch["targets"][:, :1], "weights": batch["weights"][:, :1]}
