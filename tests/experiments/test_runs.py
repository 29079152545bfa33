"""experiments/lib/runs.py: the JSONL store (resume, torn and damaged lines), the statistics, the docs blocks.

The statistics are checked against independent computations: scipy's paired t-test (two rows),
the textbook two-way ANOVA sums of squares (balanced rows x seeds), Holm on hand-worked p-values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments.lib import runs
from oracles.helpers import assert_close


# ----------------------------------------------------------------------------------------------
# The store.


def test_append_and_load_round_trip_and_resume_skips_finished_runs(tmp_path):
  path = tmp_path / "r.jsonl"
  assert runs.load(path) == ([], None)
  planned = [{"row": r, "seed": s, "lr": 1e-3} for r in ("a", "b") for s in (0, 1)]
  for p in planned[:3]:
    runs.append(path, {**p, "fact_nll": 1.0})
  records, note = runs.load(path)
  assert note is None and [runs.key_of(r, ("row", "seed")) for r in records] == [("a", 0), ("a", 1), ("b", 0)]
  assert runs.missing(planned, records, ("row", "seed", "lr")) == [planned[3]]
  # Another lr is another run.
  assert runs.missing([{**planned[0], "lr": 3e-3}], records, ("row", "seed", "lr")) == [{**planned[0], "lr": 3e-3}]


def test_a_torn_last_line_is_skipped_reported_and_dropped_by_the_next_append(tmp_path, capsys):
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps({"row": "a", "seed": 0}) + "\n" + '{"row": "b", "se')
  records, note = runs.load(path)
  assert records == [{"row": "a", "seed": 0}] and "torn last line 2" in note
  runs.append(path, {"row": "b", "seed": 0})
  assert "dropped" in capsys.readouterr().out
  assert runs.load(path) == ([{"row": "a", "seed": 0}, {"row": "b", "seed": 0}], None)
  assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2


@pytest.mark.parametrize("bad", ['{"row": "b", "se', "[1, 2]"])
def test_damage_before_the_last_line_is_refused_and_nothing_is_written(tmp_path, bad):
  path = tmp_path / "r.jsonl"
  text = json.dumps({"row": "a"}) + "\n" + bad + "\n" + json.dumps({"row": "c"}) + "\n"
  path.write_text(text)
  with pytest.raises(runs.DamagedResults, match="line 2 of 3"):
    runs.load(path)
  with pytest.raises(runs.DamagedResults):
    runs.append(path, {"row": "d"})
  assert path.read_text() == text


def test_an_unserialisable_record_leaves_the_file_as_it_was(tmp_path):
  path = tmp_path / "r.jsonl"
  runs.append(path, {"row": "a"})
  before = path.read_text()
  with pytest.raises(TypeError):
    runs.append(path, {"row": "b", "x": object()})
  assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_heavy_lock_excludes_another_holder(tmp_path):
  import fcntl
  lock = tmp_path / "lock"
  with runs.heavy_lock(lock) as waited:
    assert waited >= 0
    with open(lock) as f, pytest.raises(BlockingIOError):
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(lock) as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
  with runs.heavy_lock(None) as waited:
    assert waited == 0.0


# ----------------------------------------------------------------------------------------------
# Statistics.


def _balanced(rng, rows=4, seeds=5, effects=(0.0, 0.3, 0.1, -0.2)):
  seed_effects = rng.normal(size=seeds)
  return {(f"r{i}", s): effects[i] + seed_effects[s] + 0.1 * rng.normal() for i in range(rows)
          for s in range(seeds)}


def test_holm_on_hand_worked_p_values():
  # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> raised to 0.06 (monotone).
  assert_close(runs.holm([0.01, 0.04, 0.03, 0.005]), np.array([0.03, 0.06, 0.06, 0.02]))
  assert_close(runs.holm([0.5, 0.9]), np.array([1.0, 1.0]))  # capped at 1
  out = runs.holm([0.02, math.nan, 0.01])  # a NaN is not counted in the family: m = 2
  assert math.isnan(out[1])
  assert_close(out[[0, 2]], np.array([0.02, 0.02]))


def test_two_rows_give_scipys_paired_t_test():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=6), rng.normal(size=6) + 0.5
  values = {**{("a", s): a[s] for s in range(6)}, **{("b", s): b[s] for s in range(6)}}
  c = runs.contrasts(values, [("a", "b")])[0]
  ref = stats.ttest_rel(a, b)
  assert_close(np.array([c.t, c.p, c.estimate]), np.array([ref.statistic, ref.pvalue, (a - b).mean()]))
  assert c.df == 5 and c.p_holm == c.p
  ci = ref.confidence_interval()
  assert_close(np.array([c.low, c.high]), np.array([ci.low, ci.high]))


def test_pooled_error_matches_the_two_way_anova_computation():
  rng = np.random.default_rng(1)
  values = _balanced(rng)
  y = np.array([[values[(f"r{i}", s)] for s in range(5)] for i in range(4)])
  # Textbook two-way ANOVA without replication: residual = y - row mean - seed mean + grand mean.
  resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
  mse, df = (resid ** 2).sum() / (3 * 4), 3 * 4
  model = runs.fit_rows_seeds(values)
  assert model.df == df and model.n == 20
  assert_close(np.array([model.sigma2]), np.array([mse]))
  c = runs.contrast(model, "r1", "r3")
  t = (y[1].mean() - y[3].mean()) / math.sqrt(2 * mse / 5)
  assert_close(np.array([c.estimate, c.t, c.p]),
               np.array([y[1].mean() - y[3].mean(), t, 2 * stats.t.sf(abs(t), df)]))
  half = stats.t.ppf(0.975, df) * math.sqrt(2 * mse / 5)
  assert_close(np.array([c.low, c.high]), np.array([c.estimate - half, c.estimate + half]))
  # The pooled error is what a row-effect F test uses: F = MS_rows / MSE, as scipy would from the sums of squares.
  ms_rows = 5 * ((y.mean(1) - y.mean()) ** 2).sum() / 3
  assert stats.f.sf(ms_rows / model.sigma2, 3, df) < 0.05  # the effects (0.3 apart) are 3 noise SDs


def test_a_missing_cell_is_fitted_by_least_squares_not_dropped_rows():
  rng = np.random.default_rng(2)
  values = _balanced(rng)
  del values[("r0", 4)]
  model = runs.fit_rows_seeds(values)
  assert model.n == 19 and model.df == 19 - 8
  # Same fit from an independent parametrisation (every row and seed as its own column, min-norm solution).
  keys = list(values)
  x = np.zeros((19, 9))
  for k, (r, s) in enumerate(keys):
    x[k, int(r[1])] = x[k, 4 + s] = 1.0
  beta = np.linalg.pinv(x) @ np.array([values[k] for k in keys])
  assert_close(np.array([runs.contrast(model, "r1", "r0").estimate]), np.array([beta[1] - beta[0]]))


def test_contrasts_apply_holm_over_the_family_and_skip_absent_rows():
  rng = np.random.default_rng(3)
  values = _balanced(rng, effects=(0.0, 1.0, 0.02, 0.0))
  family = runs.contrasts(values, [("r1", "r0"), ("r2", "r0"), ("r3", "r0"), ("r9", "r0")])
  assert [(c.a, c.b) for c in family] == [("r1", "r0"), ("r2", "r0"), ("r3", "r0")]
  assert_close(np.array([c.p_holm for c in family]), runs.holm([c.p for c in family]))
  assert family[0].significant and not family[2].significant


def test_paired_contrasts_are_scipys_paired_t_tests_holm_corrected():
  rng = np.random.default_rng(4)
  values = _balanced(rng, effects=(0.0, 1.0, 0.05, 0.0))
  pairs = [("r1", "r0"), ("r2", "r0"), ("r3", "r2")]
  family = runs.paired_contrasts(values, pairs)
  y = {r: np.array([values[(r, s)] for s in range(5)]) for r in ("r0", "r1", "r2", "r3")}
  ref = [stats.ttest_rel(y[a], y[b]) for a, b in pairs]
  assert_close(np.array([c.t for c in family]), np.array([t.statistic for t in ref]))
  assert_close(np.array([c.p_holm for c in family]), runs.holm([t.pvalue for t in ref]))
  assert all(c.df == 4 for c in family)


def test_bad_fits_are_refused():
  with pytest.raises(ValueError, match="no residual degree"):
    runs.fit_rows_seeds({("a", 0): 1.0, ("b", 0): 2.0})
  with pytest.raises(ValueError, match="non-finite"):
    runs.fit_rows_seeds({("a", 0): 1.0, ("b", 0): math.inf, ("a", 1): 1.0, ("b", 1): 2.0})
  with pytest.raises(ValueError, match=">= 2 rows"):
    runs.fit_rows_seeds({("a", 0): 1.0, ("a", 1): 2.0})


# ----------------------------------------------------------------------------------------------
# Docs blocks.


def test_update_block_creates_appends_replaces_and_refuses_broken_markers(tmp_path):
  page = tmp_path / "docs" / "results.md"
  assert runs.update_block(page, "one", "first", heading="One") == "created"
  assert runs.update_block(page, "two", "second") == "appended"
  assert runs.update_block(page, "one", "first again") == "replaced"
  text = page.read_text()
  assert text.startswith("## One\n\n<!-- one:start -->\nfirst again\n<!-- one:end -->")
  assert "<!-- two:start -->\nsecond\n<!-- two:end -->" in text and "first\n" not in text
  page.write_text(text.replace("<!-- two:end -->", ""))
  with pytest.raises(ValueError, match="appear 1 and 0 times"):
    runs.update_block(page, "two", "x")
