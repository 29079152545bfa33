"""The benchmarks' shared statistics, pinning and floor (experiments/lib/bench.py), and the docs' tables
(experiments/bench_docs.py)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_docs, gemma3_bf16_curves
from experiments.lib import bench, plots
from oracles.helpers import REPO_ROOT, assert_close


def test_paired_ratio_is_the_median_of_per_round_ratios_with_an_interval_around_it():
  rng = np.random.default_rng(0)
  den = rng.uniform(1.0, 2.0, 40)  # load drifting between rounds: it cancels in each round's ratio
  num = den * rng.normal(1.05, 0.01, 40)
  r = bench.paired_ratio(num, den)
  assert r["median"] == pytest.approx(np.median(num / den)) and r["rounds"] == 40
  assert r["ci95"][0] < r["median"] < r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.02
  assert bench.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == {"median": 2.0, "ci95": [2.0, 2.0], "rounds": 3}
  with pytest.raises(ValueError, match=r"as many rounds.*\(2,\) vs \(3,\)"):
    bench.paired_ratio([1.0, 2.0], [1.0, 2.0, 3.0])


def test_one_thread_pins_the_first_allowed_core_and_sets_xlas_and_openmps_thread_flags():
  cmd, env = bench.pinned_command(1, ["python", "-m", "x"], {"XLA_FLAGS": "--xla_foo=1 --xla_cpu_multi_thread_eigen=true"})
  first = str(min(os.sched_getaffinity(0)))  # core 0 unless this process is pinned elsewhere
  assert cmd[:3] == ["taskset", "-c", first] and cmd[3:] == ["python", "-m", "x"]
  flags = env["XLA_FLAGS"].split()
  assert "--xla_foo=1" in flags and "--xla_cpu_multi_thread_eigen=false" in flags
  assert "--xla_cpu_multi_thread_eigen=true" not in flags and "intra_op_parallelism_threads=1" in flags
  assert env[bench.PINNED_ENV] == "1" and env["OMP_NUM_THREADS"] == "1"
  with pytest.raises(ValueError, match="more cores than this process may use"):
    bench.pinned_command(10_000, ["python"], {})


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.tanh(nn.Dense(4, name="first")(x)))


def test_the_floor_differentiates_up_to_the_named_outputs_and_refuses_unknown_ones():
  model, x = TwoLayers(), jnp.ones((2, 5))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, batch: (model.apply({"params": p}, batch) ** 2).sum()
  v = bench.floor_variant(loss, params, x, paths=("first",))
  value, grads = v.call()
  assert float(value) == pytest.approx(float(loss(params, x)), rel=1e-6)
  # d loss / d (scalar added to the first layer's outputs) = the sum of the cotangent at those outputs.
  first, out = params["first"], params["out"]
  cotangent = jax.grad(lambda z: ((jnp.tanh(z) @ out["kernel"] + out["bias"][None]) ** 2).sum())(
      x @ first["kernel"] + first["bias"][None])
  assert float(grads["first"]) == pytest.approx(float(cotangent.sum()), rel=1e-5)
  with pytest.raises(ValueError, match=r"\['nope'\] are not kernel layers"):
    bench.floor_variant(loss, params, x, paths=("first", "nope"))


def test_the_docs_tables_are_generated_from_the_committed_results():
  doc = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
  assert "<!-- table: core -->" in doc
  assert bench_docs.render(doc) == doc, "docs/benchmarks.md's tables are stale: run python -m experiments.bench_docs"


def test_tables_without_results_say_how_to_make_them_and_bad_markers_are_refused(tmp_path):
  text = "intro\n<!-- table: core -->\nold\n<!-- /table -->\nend\n"
  want = "intro\n<!-- table: core -->\n*(no results in the current format yet: run `make bench`)*\n<!-- /table -->\nend\n"
  assert bench_docs.render(text, tmp_path) == want
  (tmp_path / "bench_core.json").write_text('{"rows": {}, "ratios": {}}')  # predates the "run" record: not tabulated
  assert bench_docs.render(text, tmp_path) == want
  with pytest.raises(ValueError, match=r"unknown table markers \['nope'\]"):
    bench_docs.render("<!-- table: nope -->\n<!-- /table -->\n", tmp_path)
  with pytest.raises(ValueError, match="2 table markers but 1 closed"):
    bench_docs.render("<!-- table: core -->\n<!-- /table -->\n<!-- table: core -->\n", tmp_path)


def test_a_pipe_in_a_cell_is_escaped_so_the_row_keeps_its_columns():
  out = bench_docs.table(["lever", "ratio"], [["x·[W | Aᵀ]", "1.1"]])
  assert out.splitlines()[2] == "| x·[W \\| Aᵀ] | 1.1 |"


def test_bf16_curves_pair_each_seeds_runs_and_draw_them_beside_the_seed_noise(tmp_path):
  def run(losses, held):
    return {"losses": losses, "held_out_loss": held}

  runs = {"float32": [run([3.0, 2.0, 1.0, 0.5], 0.9), run([3.2, 2.4, 1.4, 0.7], 1.1)],
          "bfloat16": [run([3.0, 2.1, 1.1, 0.6], 1.0), run([3.2, 2.4, 1.6, 0.9], 1.3)]}
  s = gemma3_bf16_curves.summarize(runs, steps=4)
  assert_close(np.asarray(s["per_step"]["diff_mean"]), np.asarray([0.0, 0.05, 0.15, 0.15]))
  assert_close(np.asarray(s["per_step"]["float32_sd"]), np.std([[3.0, 2.0, 1.0, 0.5], [3.2, 2.4, 1.4, 0.7]], axis=0, ddof=1))
  # The last quarter of 4 steps is the last step: paired differences 0.1 and 0.2.
  assert_close(s["last_quarter_train_loss"]["paired_diff_mean"], 0.15)
  assert_close(s["held_out_loss"]["paired_diff_mean"], 0.15)
  assert_close(s["held_out_loss"]["seed_sd_float32"], np.std([0.9, 1.1], ddof=1))

  png = tmp_path / "curves.png"
  plots.paired_curves({d: [r["losses"] for r in rs] for d, rs in runs.items()}, png, "t")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="float32 has 2 seeds x 4 steps but bfloat16 1 x 4"):
    plots.paired_curves({"float32": [[1, 2, 3, 4]] * 2, "bfloat16": [[1, 2, 3, 4]]}, png, "t")


def test_the_levers_table_takes_a_size_missing_from_bench_levers_json_from_its_own_file(tmp_path):
  def result(size, names):
    rows = [{"name": n, "over_frozen": {"median": 1.0 + i / 10, "ci95": [1.0, 1.5]}, "gb_accessed": 1.0,
             "memory": {"peak_estimate_bytes": 2**20}} for i, n in enumerate(names)]
    return {"run": {"threads": 1}, "runs": {size: {"rows": rows}}}

  (tmp_path / "bench_levers.json").write_text(json.dumps(result("1024", ["frozen fwd+bwd", "a", "library inject"])))
  (tmp_path / "bench_levers_h256.json").write_text(json.dumps(result("256", ["frozen fwd+bwd", "b", "library inject"])))
  lines = bench_docs.levers_table(tmp_path).splitlines()
  assert lines[0].startswith("| lever (LoRA step / frozen fwd+bwd) | hidden 256 | hidden 1024 |")
  assert lines[2].startswith("| b | 1.100 [1.000, 1.500] | - |")
  assert lines[3].startswith("| a | - | 1.100 [1.000, 1.500] |")
  assert lines[4].startswith("| **the library** (`mos_jax.linen.adapted_loss`) | 1.200 [1.000, 1.500] | 1.200")
  assert "`bench_levers_h256.json`" in lines[5] and "`bench_levers.json`" in lines[6]
