"""Tests for experiments/lib/sentiment_data.py: TSV validation, SST-2, generated data, tokenize."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.lib import sentiment_data as sd
from oracles.helpers import REPO_ROOT


def _write(tmp_path: Path, content: str, name: str = "data.tsv") -> Path:
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  return path


def _sst2_dir() -> Path:
  shared = os.environ.get("MOS_SHARED_DATA")
  base = Path(shared) if shared else REPO_ROOT.parent / "shared" / "data"
  return base / "sst2"


# ----------------------------------------------------------------------------- load_tsv


def test_load_tsv_reads_valid_file_with_crlf_and_candidate_columns(tmp_path):
  path = _write(tmp_path, "label\tcontent\r\n1\t a fine film \r\n0\tdull\r\n")
  texts, labels = sd.load_tsv(path)
  assert texts == ["a fine film", "dull"]
  assert labels.dtype == np.int32 and labels.tolist() == [1, 0]


def test_load_tsv_prefers_first_candidate_column(tmp_path):
  path = _write(tmp_path, "text\tlabel\tsentence\nA\t1\tB\n")
  assert sd.load_tsv(path)[0] == ["B"]
  assert sd.load_tsv(path, text_column="text")[0] == ["A"]


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"nope\.tsv.*not found"):
    sd.load_tsv(tmp_path / "nope.tsv")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
  path = _write(tmp_path, content)
  with pytest.raises(ValueError, match=r"data\.tsv.*empty.*Fix"):
    sd.load_tsv(path)


def test_header_only(tmp_path):
  with pytest.raises(ValueError, match="no examples"):
    sd.load_tsv(_write(tmp_path, "label\tsentence\n"))


def test_missing_text_column_lists_columns_found(tmp_path):
  path = _write(tmp_path, "label\treview\n1\tok\n")
  with pytest.raises(ValueError, match=r"data\.tsv.*text column.*\['label', 'review'\]"):
    sd.load_tsv(path)


def test_missing_label_column(tmp_path):
  path = _write(tmp_path, "target\tsentence\n1\tok\n")
  with pytest.raises(ValueError, match=r"label column 'label'.*\['target', 'sentence'\]"):
    sd.load_tsv(path)


def test_label_outside_class_set_gives_line_number(tmp_path):
  path = _write(tmp_path, "label\tsentence\n1\tok\n0\tbad\n2\twhat\n")
  with pytest.raises(ValueError, match=r"data\.tsv:4: label 2 is outside.*\{0\.\.1\}"):
    sd.load_tsv(path)
  assert sd.load_tsv(path, num_classes=3)[1].tolist() == [1, 0, 2]


@pytest.mark.parametrize("bad", ["pos", "1.0", "", "-1"])
def test_non_integer_or_negative_label(tmp_path, bad):
  path = _write(tmp_path, f"label\tsentence\n1\tok\n{bad}\tbad\n")
  with pytest.raises(ValueError, match=r"data\.tsv:3: label"):
    sd.load_tsv(path)


def test_empty_sentence(tmp_path):
  path = _write(tmp_path, "label\tsentence\n1\tok\n0\t   \n")
  with pytest.raises(ValueError, match=r"data\.tsv:3: empty 'sentence'"):
    sd.load_tsv(path)


def test_wrong_field_count(tmp_path):
  path = _write(tmp_path, "label\tsentence\n1\tok\textra\n")
  with pytest.raises(ValueError, match=r"data\.tsv:2: expected 2"):
    sd.load_tsv(path)


def test_load_sst2_missing_dir_and_missing_dev(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    sd.load_sst2(tmp_path / "absent")
  _write(tmp_path, "label\tsentence\n1\tok\n", "train.tsv")
  with pytest.raises(ValueError, match=r"dev\.tsv.*not found"):
    sd.load_sst2(tmp_path)


def test_get_data_errors_on_given_but_missing_dir(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    sd.get_data(tmp_path / "absent", seed=0, n_train=4, n_eval=4)


def test_get_data_from_dir_and_max_train(tmp_path):
  rows = "".join(f"{i % 2}\tsentence {i}\n" for i in range(10))
  _write(tmp_path, "label\tsentence\n" + rows, "train.tsv")
  _write(tmp_path, "label\tcontent\n1\tgood\n0\tbad\n", "dev.tsv")
  data = sd.get_data(tmp_path, seed=0, n_train=99, n_eval=99, max_train=4)
  assert data["source"].startswith("tsv:")
  texts, labels = data["train"]
  assert len(texts) == 4 and len(set(texts)) == 4
  assert all(int(t.split()[1]) % 2 == l for t, l in zip(texts, labels))
  assert data["dev"][0] == ["good", "bad"]


# ----------------------------------------------------------------------------- real SST-2


@pytest.mark.skipif(not _sst2_dir().is_dir(), reason="shared SST-2 data not present")
def test_real_sst2():
  data = sd.load_sst2(_sst2_dir())
  (train_x, train_y), (dev_x, dev_y) = data["train"], data["dev"]
  assert len(train_x) == len(train_y) == 67349
  assert len(dev_x) == len(dev_y) == 872
  assert set(np.unique(train_y)) == {0, 1} and set(np.unique(dev_y)) == {0, 1}
  assert train_x[0] == "hide new secretions from the parental units"
  assert all(x and "\t" not in x and "\r" not in x for x in train_x + dev_x)
  assert 0.4 < dev_y.mean() < 0.6


# ----------------------------------------------------------------------------- generated

_ADJ = "|".join(sd.POSITIVE + sd.NEGATIVE)
_CLAUSE = (rf"(?:{'|'.join(sd.SUBJECTS)}) (?:{'|'.join(sd.VERBS)})"
           rf"(?: (?P<neg{{i}}>{'|'.join(sd.NEGATIONS)}))?"
           rf"(?: (?:{'|'.join(sd.INTENSIFIERS)}))? (?P<adj{{i}}>{_ADJ})")
_BODY = f"{_CLAUSE.format(i=1)}(?: , but {_CLAUSE.format(i=2)})?"


def _frames_and_labels(texts: list[str]) -> tuple[list[str], list[int]]:
  """Independently parse each text: which frame wraps it, and the label the rules imply."""
  all_frames = sd.TRAIN_FRAMES + sd.EVAL_FRAMES
  patterns = [re.compile("^" + re.escape(f).replace(re.escape("{body}"), _BODY) + "$")
              for f in all_frames]
  frames, labels = [], []
  for text in texts:
    matches = [(f, m) for f, p in zip(all_frames, patterns) if (m := p.match(text))]
    assert len(matches) == 1, (text, [f for f, _ in matches])
    frame, m = matches[0]
    last = "2" if m.group("adj2") else "1"
    positive = m.group("adj" + last) in sd.POSITIVE
    negated = m.group("neg" + last) is not None
    frames.append(frame)
    labels.append(int(positive != negated))
  return frames, labels


def test_generated_is_deterministic_and_seed_dependent():
  a, b = sd.generate_sentiment(3, 50, 20), sd.generate_sentiment(3, 50, 20)
  for split in ("train", "dev"):
    assert a[split][0] == b[split][0]
    np.testing.assert_array_equal(a[split][1], b[split][1])
  assert sd.generate_sentiment(4, 50, 20)["train"][0] != a["train"][0]


def test_generated_sizes_and_balance():
  data = sd.generate_sentiment(0, 200, 101)
  for split, n in (("train", 200), ("dev", 101)):
    texts, labels = data[split]
    assert len(texts) == len(labels) == n and labels.dtype == np.int32
    assert abs(int(labels.sum()) - n // 2) <= 1
  assert len(set(data["train"][0])) > 190  # mostly distinct sentences


def test_generated_labels_follow_composition_rules_and_eval_frames_held_out():
  data = sd.generate_sentiment(1, 600, 300)
  train_frames, train_rule = _frames_and_labels(data["train"][0])
  dev_frames, dev_rule = _frames_and_labels(data["dev"][0])
  assert train_rule == data["train"][1].tolist()
  assert dev_rule == data["dev"][1].tolist()
  assert set(train_frames) == set(sd.TRAIN_FRAMES)
  assert set(dev_frames) == set(sd.EVAL_FRAMES)
  assert not set(sd.TRAIN_FRAMES) & set(sd.EVAL_FRAMES)
  assert not set(data["train"][0]) & set(data["dev"][0])
  # every phenomenon is present in both splits
  for texts in (data["train"][0], data["dev"][0]):
    words = " ".join(texts).split()
    assert {"but", "very", "extremely", *sd.NEGATIONS} <= set(words)


def test_negation_flips_label_and_intensifier_keeps_it():
  base = sd.Clause("the movie", "is", "good")
  assert base.label == 1
  for neg in sd.NEGATIONS:
    flipped = sd.Clause("the movie", "is", "good", negation=neg)
    assert flipped.label == 0
    assert sd.Clause("the movie", "is", "dull", negation=neg).label == 1
  assert sd.Clause("the movie", "is", "good", intensifier="extremely").label == 1
  text, label = sd.compose("{body} .", [sd.Clause("the movie", "was", "good",
                                                   negation="not", intensifier="very")])
  assert (text, label) == ("the movie was not very good .", 0)


def test_contrast_clause_after_but_decides():
  good, bad = sd.Clause("the plot", "is", "great"), sd.Clause("the cast", "was", "weak")
  assert sd.compose("i think {body} .", [good, bad]) == (
      "i think the plot is great , but the cast was weak .", 0)
  assert sd.compose("{body} .", [bad, good])[1] == 1


def test_get_data_falls_back_to_generated_without_network():
  data = sd.get_data(None, seed=5, n_train=30, n_eval=10, max_train=20)
  assert data["source"] == "generated:seed=5"
  assert len(data["train"][0]) == 20 and len(data["dev"][0]) == 10


def test_try_load_hf_returns_none_without_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  assert sd.try_load_hf_sst2() is None


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_pads_to_max_len_as_int32(tmp_path):
  from transformers import BertTokenizerFast

  words = ["the", "movie", "was", "not", "very", "good", "."]
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
  tok = BertTokenizerFast(vocab_file=str(vocab))
  out = sd.tokenize(tok, ["the movie was good .", "the movie was not very good . " * 3], 8)
  assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
  for arr in out.values():
    assert arr.dtype == np.int32 and arr.shape == (2, 8)
  # [CLS] the movie was good . [SEP] [PAD]
  assert out["input_ids"][0].tolist() == [2, 5, 6, 7, 10, 11, 3, 0]
  assert out["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
  assert out["input_ids"][1, -1] == 3  # truncated, still ends with [SEP]
  assert not out["token_type_ids"].any()
