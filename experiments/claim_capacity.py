"""The paper's claim where adapter capacity binds: MoS vs LoRA at equal budget on the real Gemma 3 270M.

The task (:mod:`experiments.lib.facts`): memorise ``N`` made-up names, each mapped to one of 64
single-token words ("Kalomi's favorite word is" -> " river"), with the full-vocabulary LM loss at
the answer. Only the MLP ``down_proj`` of each of the 18 layers is adapted, so LoRA r=1 has
18 x (2048 + 640) = 48,384 trainable parameters and cannot store many facts, while MoS at the
same budget works at active rank 8. Metrics on all ``N`` facts: the answer's NLL and the
accuracy (argmax among the 64 words), with the training prompt and with a paraphrase never
trained on.

Rows: LoRA r = 1, 2, 4, 8 (the parameters-vs-quality curve); MoS r=8 r_e=1 l=2; the paper's
Table 1 progression at that budget (pure sharing -> + subset selection -> + pair dissociation
-> + vector sharding = MoS); MoS r_e=2 with and without shard privatization.

Protocol: every row's lr is chosen from one grid on a tuning seed (its own task draw and data
order) that the analysis never sees; then seeds 0-3 at that lr (each seed draws its own task
and data order, the same for every row); then one 3x-longer run of LoRA r=1 and of MoS (seed
0) to tell capacity from learning speed. A second, larger ``N`` repeats the LoRA curve and MoS.
Each finished run is one line of ``experiments/results/claim_capacity.jsonl``
(:mod:`experiments.lib.runs`); a rerun skips it. Every run takes the machine's heavy-job lock
(``--lock``) for itself alone. ``--report`` rebuilds the table, verdicts and plot in
``docs/results.md`` from the JSONL alone.

    .venv/bin/python -m experiments.claim_capacity                 # what is missing, then the report
    .venv/bin/python -m experiments.claim_capacity --max-runs 10   # a sitting of at most 10 runs
    .venv/bin/python -m experiments.claim_capacity --report        # table + plot from the JSONL only
    .venv/bin/python -m experiments.claim_capacity --quick         # smoke test: 7 tiny runs (~5 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mos_jax import MoSConfig
from experiments.lib import facts, gemma3_weights, instruct, runs
from experiments.lib.config import TrainConfig
from experiments.lib.paths import REPO, RESULTS_DIR
from experiments.lib.plots import metric_vs_params

RESULTS = RESULTS_DIR / "claim_capacity.jsonl"
QUICK_RESULTS = REPO / "runs" / "claim_capacity_quick" / "claim_capacity.jsonl"
LOCK = "/tmp/mos_heavy.lock"
RUN_KEY = ("setup_hash", "row", "seed", "lr", "steps")

LORA_RANKS = (1, 2, 4, 8)
MOS = "MoS r=8 r_e=1 l=2"
PURE = "pure sharing (r=18)"
SUBSET = "+ subset selection (r=8)"
PAIR = "+ pair dissociation (r=8)"
MOS2 = "MoS r=16 r_e=2 r_p=1 l=2"
MOS2_NOPRIV = "MoS r=16 r_e=2 l=2 - shard privatization"


@dataclasses.dataclass(frozen=True)
class Setup:
  """One table's settings (one ``N``); every row runs under the same ones.

  Attributes:
    n_facts: ``N``, the facts to memorise (a multiple of 64).
    steps: training steps of the normal runs (the issue's pilot: 120 x 16); the long runs take
      ``long_factor`` times more.
    lrs: the lr grid, in the order it is searched (the likeliest lrs first); the choice does not
      depend on the order.
    rows: the rows this setup runs (names of :func:`row_configs`), in the order they are run, in
      groups of ``group``: the group's lr searches lr by lr across the group, then its seeds seed
      by seed across the group, so that a sitting cut short leaves whole pairs to compare.
    long_rows: the rows that also get one long run (on ``seeds[0]``).
    lr_from: ``None``: the lr is searched on the tuning seed; else the lrs chosen by this other
      setup are reused (no search) and runs go seed by seed across the rows.
  """

  n_facts: int = 256
  steps: int = 120
  batch_size: int = 16
  lrs: tuple[float, ...] = (2e-3, 4e-3, 1e-3, 8e-3)
  tuning_seed: int = 1000
  seeds: tuple[int, ...] = (0, 1, 2, 3)
  rows: tuple[str, ...] = ()
  long_rows: tuple[str, ...] = ()
  long_factor: int = 3
  seq_len: int = 12
  warmup_frac: float = 0.1
  clip_norm: float = 1.0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("down_proj",)
  eval_batch: int = 64
  lr_from: "Setup | None" = None
  group: int = 2

  def setup_hash(self) -> str:
    """What makes runs comparable: every field but the grid, seeds and row lists (extending those keeps runs)."""
    fields = {k: v for k, v in dataclasses.asdict(self).items()
              if k not in ("lrs", "seeds", "rows", "long_rows", "tuning_seed", "long_factor", "eval_batch", "lr_from",
                           "group")}
    task = {"train": facts.TRAIN_PROMPT, "para": facts.PARAPHRASE_PROMPT, "syllables": facts.SYLLABLES,
            "words": facts.CANDIDATE_WORDS}
    return hashlib.sha256(json.dumps({"setup": fields, "task": task}, sort_keys=True).encode()).hexdigest()[:12]


def row_configs(setup: Setup, num_layers: int = 18) -> dict[str, MoSConfig]:
  """Every row's adapter config, in table order.

  The equal-budget rows (MoS and the progression) have LoRA r=1's trainable count; the two
  r_e = 2 rows have LoRA r=2's. No dropout: memorisation is the task.
  """
  common = dict(alpha=setup.alpha, dropout=0.0, target_modules=setup.targets)
  mos = MoSConfig(rank=8, equivalent_rank=1, private_rank=0, shards_per_vector=2, **common)
  mos2 = MoSConfig(rank=16, equivalent_rank=2, private_rank=1, shards_per_vector=2, **common)
  out = {f"LoRA r={r}": MoSConfig.lora(r, **common) for r in LORA_RANKS}
  out.update({
      PURE: MoSConfig.pure_sharing(1, num_layers=num_layers, **common),
      SUBSET: dataclasses.replace(mos, pair_dissociation=False, vector_sharding=False),
      PAIR: dataclasses.replace(mos, vector_sharding=False),
      MOS: mos,
      MOS2: mos2,
      MOS2_NOPRIV: dataclasses.replace(mos2, shard_privatization=False),
  })
  return out


ALL_ROWS = tuple(row_configs(Setup()))
#: The run order: the pre-registered contrasts' rows first.
MAIN = Setup(rows=(MOS, "LoRA r=1", "LoRA r=8", PURE, SUBSET, PAIR, "LoRA r=2", "LoRA r=4", MOS2, MOS2_NOPRIV),
             long_rows=("LoRA r=1", MOS))
LARGE = Setup(n_facts=512, steps=240, rows=("LoRA r=8", MOS), lr_from=MAIN)
QUICK = Setup(n_facts=64, steps=3, batch_size=4, lrs=(3e-3,), seeds=(0, 1), rows=("LoRA r=1", MOS),
              long_rows=("LoRA r=1",), long_factor=2, eval_batch=32)


# ----------------------------------------------------------------------------------------------
# One run.


def batch_order(n: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
  """``indices(step)`` (1-based): the facts of each step, epoch after epoch, each epoch a fresh shuffle of ``seed``."""

  @functools.lru_cache(maxsize=4)
  def epoch(e: int) -> np.ndarray:
    return np.random.default_rng([seed, e, 3]).permutation(n)

  def indices(step: int) -> np.ndarray:
    flat = np.arange((step - 1) * batch_size, step * batch_size)
    return np.asarray([epoch(int(i // n))[i % n] for i in flat])

  return indices


@dataclasses.dataclass(frozen=True)
class Encoded:
  task: facts.FactTask
  fact: instruct.Batch
  para: instruct.Batch


def encode_task(tokenizer: Any, setup: Setup, seed: int) -> Encoded:
  """The task of ``seed`` (names, answers) with both prompts."""
  task = facts.make_task(seed, setup.n_facts, tokenizer)
  return Encoded(task, facts.encode(task, tokenizer, facts.TRAIN_PROMPT, setup.seq_len),
                 facts.encode(task, tokenizer, facts.PARAPHRASE_PROMPT, setup.seq_len))


def train_and_score(model: Any, data: Encoded, mos: MoSConfig, setup: Setup, *, lr: float, seed: int, steps: int,
                    name: str) -> dict[str, Any]:
  """Trains one adapter (seeded by ``seed``) on the facts and scores it on both prompts.

  Returns:
    ``trainable``, ``fact_*`` and ``para_*`` (``nll``, ``acc``, ``greedy``), ``train_loss``
    (the mean loss of each quarter of the steps), ``step_seconds``, ``compile_seconds``.
  """
  order = batch_order(setup.n_facts, setup.batch_size, seed)

  def next_batch(step: int) -> tuple[instruct.Batch, int]:
    return instruct.take(data.fact, order(step)), setup.batch_size

  with tempfile.TemporaryDirectory(prefix="claim_capacity_") as out_dir:
    cfg = TrainConfig(mos=dataclasses.replace(mos, seed=seed), lr=lr, steps=steps, batch_size=setup.batch_size,
                      warmup_frac=setup.warmup_frac, clip_norm=setup.clip_norm, eval_every=steps, seed=seed,
                      out_dir=out_dir, progress=False)
    trained = instruct.train_adapter(model, next_batch, cfg, name=name)
  sums = instruct.scorer(trained, data.task.word_ids)
  out = {"trainable": int(sum(x.size for x in jax.tree_util.tree_leaves(trained["adapter"])))}
  for split in ("fact", "para"):
    m = instruct.metrics(sums, getattr(data, split), setup.eval_batch)
    out.update({f"{split}_nll": m["nll"], f"{split}_acc": m["accuracy"], f"{split}_greedy": m["greedy"]})
  losses = np.asarray([m["loss"] for m in trained["metrics"]])
  out["train_loss"] = [float(q.mean()) for q in np.array_split(losses, min(4, len(losses)))]
  out["step_seconds"] = trained["step_seconds"]
  out["compile_seconds"] = setup.batch_size / trained["metrics"][0]["examples_per_s"]
  return out


# ----------------------------------------------------------------------------------------------
# The plan: which runs, in which order, resumably.


def planned(setup: Setup, records: Sequence[dict]) -> list[dict]:
  """The runs of ``setup`` in order (see :class:`Setup`): per row its lr search on the tuning seed, then its seeds.

  A row's seeds are planned once its lr is known; the long runs come after every row.
  """
  h = setup.setup_hash()

  def run(row, seed, lr, steps=setup.steps, tuning=False):
    return dict(setup_hash=h, row=row, seed=seed, lr=lr, steps=steps, tuning=tuning)

  lrs = {row: chosen_lr(records, row, setup) for row in setup.rows}
  plan = []
  if setup.lr_from is None:
    for i in range(0, len(setup.rows), setup.group):
      group = setup.rows[i:i + setup.group]
      plan += [run(row, setup.tuning_seed, lr, tuning=True) for lr in setup.lrs for row in group]
      plan += [run(row, s, lrs[row]) for s in setup.seeds for row in group if lrs[row] is not None]
  else:
    plan += [run(row, s, lrs[row]) for s in setup.seeds for row in setup.rows if lrs[row] is not None]
  plan += [run(row, setup.seeds[0], lrs[row], steps=setup.long_factor * setup.steps) for row in setup.long_rows
           if lrs[row] is not None]
  return plan


def chosen_lr(records: Sequence[dict], row: str, setup: Setup) -> float | None:
  """The grid lr with the lowest fact NLL on the tuning seed; ``None`` until the whole grid ran.

  With ``setup.lr_from``, the lr that setup chose.
  """
  if setup.lr_from is not None:
    return chosen_lr(records, row, setup.lr_from)
  tried = {r["lr"]: r["fact_nll"] for r in records if r.get("setup_hash") == setup.setup_hash()
           and r["row"] == row and r.get("tuning") and r["steps"] == setup.steps and r["lr"] in setup.lrs}
  if len(tried) < len(setup.lrs):
    return None
  return min(tried, key=lambda lr: (not math.isfinite(tried[lr]), tried[lr]))


def run_missing(setups: Sequence[Setup], path: Path, *, max_runs: int | None = None, lock: str | None = LOCK,
                pause: float = 5.0, load: Callable[[], tuple[Any, Any]] | None = None,
                launch_minutes: float | None = None) -> int:
  """Runs what the tables still lack, each run under the heavy-job lock, appending each to ``path``.

  Args:
    setups: the tables, run one after the other.
    path: the JSONL.
    max_runs: stop after this many runs (a sitting); ``None`` for all.
    launch_minutes: start no run after this many minutes from the call (the run under way
      finishes); ``None`` for no limit.
    lock: the lock file taken for each run alone (``None``: no lock).
    pause: seconds between runs with the lock released, so that others get it.
    load: returns ``(model, tokenizer)``; default the real Gemma 3 270M.

  Returns:
    How many runs were made.
  """
  started = time.monotonic()
  model, tokenizer = (load or gemma3_weights.load_gemma3_270m)()
  num_layers = model.config.num_layers
  made = 0
  tasks: dict[tuple[int, int], Encoded] = {}
  for setup in setups:
    configs = row_configs(setup, num_layers)
    while max_runs is None or made < max_runs:
      records, note = runs.load(path)
      if note:
        print(f"note: {note}", flush=True)
      todo = runs.missing(planned(setup, records), records, RUN_KEY)
      if not todo:
        break
      if launch_minutes is not None and time.monotonic() - started > 60 * launch_minutes:
        print(f"stopping: {launch_minutes:g} min since the start, {len(todo)} runs left", flush=True)
        return made
      run = todo[0]
      key = (setup.n_facts, run["seed"])
      if key not in tasks:
        tasks[key] = encode_task(tokenizer, setup, run["seed"])
      with runs.heavy_lock(lock) as waited:
        load_before, start = runs.loadavg(), time.perf_counter()
        try:
          result = train_and_score(model, tasks[key], configs[run["row"]], setup, lr=run["lr"], seed=run["seed"],
                                   steps=run["steps"], name=run["row"])
        except FloatingPointError as e:  # diverged: recorded (NaN scores), so the lr search moves on
          result = {**{f"{s}_{m}": math.nan for s in ("fact", "para") for m in ("nll", "acc", "greedy")},
                    "trainable": None, "diverged": str(e), "step_seconds": math.nan}
        seconds, load_after = time.perf_counter() - start, runs.loadavg()
      record = {**run, "n_facts": setup.n_facts, **result, "batch_size": setup.batch_size,
                "config": dataclasses.asdict(dataclasses.replace(configs[run["row"]], seed=run["seed"])),
                "setup": dataclasses.asdict(setup), "num_layers": num_layers, "seconds": seconds,
                "lock_wait_seconds": waited, "load_before": load_before, "load_after": load_after,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
      runs.append(path, record)
      made += 1
      print(f"[{made}] N={setup.n_facts} {run['row']} lr={run['lr']:g} seed={run['seed']} steps={run['steps']}: "
            f"fact NLL {result['fact_nll']:.3f} acc {result['fact_acc']:.1%}, para acc {result['para_acc']:.1%} "
            f"({seconds:.0f} s, {result['step_seconds']:.2f} s/step, load {load_before:.1f}->{load_after:.1f}; "
            f"{len(todo) - 1} planned after this)", flush=True)
      time.sleep(pause)
  return made


# ----------------------------------------------------------------------------------------------
# The report.

DOCS = REPO / "docs" / "results.md"
BLOCK = "claim-capacity"
DOCS_HEADING = "Where adapter capacity binds: MoS vs LoRA at equal budget on Gemma 3 270M"
PLOT = RESULTS_DIR / "claim_capacity.png"
PRIMARY = "fact_nll"
#: The pre-registered contrasts (a - b) of each table, Holm-corrected together per metric.
FAMILIES = {
    "main": ((MOS, "LoRA r=1"), (MOS, PURE), (MOS, "LoRA r=8"), (SUBSET, PURE), (PAIR, SUBSET), (MOS, PAIR),
             (MOS2, MOS2_NOPRIV)),
    "large": ((MOS, "LoRA r=1"), (MOS, "LoRA r=8")),
}
STEP_NAMES = {(SUBSET, PURE): "subset selection", (PAIR, SUBSET): "pair dissociation", (MOS, PAIR): "vector sharding",
              (MOS2, MOS2_NOPRIV): "shard privatization (r_e = 2)"}


def analysed(records: Sequence[dict], setup: Setup) -> dict[str, list[dict]]:
  """Per row, the runs the analysis uses: seeds (not the tuning seed) at the chosen lr and normal steps."""
  mine = [r for r in records if r.get("setup_hash") == setup.setup_hash()]
  out = {}
  for row in setup.rows:
    lr = chosen_lr(records, row, setup)
    chosen = {r["seed"]: r for r in mine if r["row"] == row and not r.get("tuning") and r["lr"] == lr
              and r["steps"] == setup.steps and r["seed"] in setup.seeds and math.isfinite(r[PRIMARY])}
    if chosen:
      out[row] = [chosen[s] for s in sorted(chosen)]
  return out


def family_results(by_row: dict[str, list[dict]], pairs: Sequence[tuple[str, str]]) -> dict[str, list[runs.Contrast]]:
  """The family's contrasts on log fact NLL (the primary metric: ratios) and on the accuracies (points)."""
  flat = [r for rs in by_row.values() for r in rs]
  seeds = {r["seed"] for r in flat}
  # The rows x seeds model has rows + seeds - 1 parameters: it needs one observation more for its error term.
  if len(by_row) < 2 or len(seeds) < 2 or len(flat) <= len(by_row) + len(seeds) - 1:
    return {}
  logs = runs.values_of(flat, PRIMARY, transform=math.log)
  out = {PRIMARY: runs.contrasts(logs, pairs, rows=list(by_row)), "paired": runs.paired_contrasts(logs, pairs)}
  for metric in ("fact_acc", "para_acc"):
    out[metric] = runs.contrasts(runs.values_of(flat, metric), pairs, rows=list(by_row))
  return out


def equivalent_lora_rank(by_row: dict[str, list[dict]], row: str = MOS) -> str | None:
  """Where ``row``'s mean log fact NLL falls on the LoRA curve (log-log interpolation), as text.

  ``None`` without the row or a curve (two or more LoRA ranks): the larger ``N`` runs LoRA r=8 only.
  """
  curve = [(r, np.mean([math.log(x[PRIMARY]) for x in by_row[f"LoRA r={r}"]])) for r in LORA_RANKS
           if f"LoRA r={r}" in by_row]
  if row not in by_row or len(curve) < 2:
    return None
  y = np.mean([math.log(x[PRIMARY]) for x in by_row[row]])
  for (r0, y0), (r1, y1) in zip(curve, curve[1:]):
    if min(y0, y1) <= y <= max(y0, y1) and y0 != y1:
      return f"{2 ** (math.log2(r0) + (y - y0) / (y1 - y0) * (math.log2(r1) - math.log2(r0))):.1f}"
  return f"< {curve[0][0]}" if y > curve[0][1] else f"> {curve[-1][0]}"


def rows_table(records: Sequence[dict], setup: Setup, by_row: dict[str, list[dict]]) -> str:
  mine = [r for r in records if r.get("setup_hash") == setup.setup_hash()]
  lines = ["| row | trainable | lr (tuning-seed fact NLL per lr) | seeds | fact NLL | fact acc. % | "
           "paraphrase NLL | paraphrase acc. % | s/step |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  for row in [r for r in row_configs(setup) if r in setup.rows]:  # table order, not run order
    tuning = {r["lr"]: r for r in mine if r["row"] == row and r.get("tuning") and r["steps"] == setup.steps}
    grid = ", ".join(f"{lr:g}: {tuning[lr][PRIMARY]:.2f} ({tuning[lr]['fact_acc']:.0%})" for lr in sorted(tuning))
    lr = chosen_lr(records, row, setup)
    if setup.lr_from is not None:
      pilot = f"; pilot: {grid}" if grid else ""
      chosen = f"{lr:g} (N = {setup.lr_from.n_facts}'s{pilot})" if lr is not None else "-"
    elif lr is not None:
      chosen = f"**{lr:g}** ({grid})"
    else:
      chosen = f"({sum(lr in tuning for lr in setup.lrs)}/{len(setup.lrs)} grid lrs: {grid or '-'})"
    rs = by_row.get(row, [])
    if not rs:
      lines.append(f"| {row} | | {chosen} | 0 | | | | | |")
      continue
    metrics = (("fact_nll", 1, 3), ("fact_acc", 100, 1), ("para_nll", 1, 3), ("para_acc", 100, 1))
    cells = [runs.mean_sd([r[m] for r in rs], scale, digits) for m, scale, digits in metrics]
    lines.append(f"| {row} | {rs[0]['trainable']:,} | {chosen} | {len(rs)} | " + " | ".join(cells) +
                 f" | {np.median([r['step_seconds'] for r in rs]):.2f} |")
  return "\n".join(lines)


def contrasts_table(results: dict[str, list[runs.Contrast]]) -> str:
  if not results:
    return ("_Contrasts need two or more rows, two or more seeds and more runs than rows + seeds - 1 (an error "
            "term)._")
  lines = ["| contrast (a vs b) | fact NLL ratio a/b [95% CI] | Holm p | Δ fact acc. (points) [95% CI] | Holm p | "
           "Δ paraphrase acc. (points) [95% CI] | Holm p |", "|---|---:|---:|---:|---:|---:|---:|"]
  acc = {m: {(c.a, c.b): c for c in results[m]} for m in ("fact_acc", "para_acc")}
  for c in results[PRIMARY]:
    cells = [runs.effect_cell(c, ratio=True), f"{c.p_holm:.2g}"]
    for m in ("fact_acc", "para_acc"):
      d = acc[m].get((c.a, c.b))
      cells += [runs.effect_cell(d, 100, 1), f"{d.p_holm:.2g}"] if d else ["n/a", ""]
    lines.append(f"| {c.a} vs {c.b} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def verdicts(results: dict[str, list[runs.Contrast]], by_row: dict[str, list[dict]], n_facts: int) -> list[str]:
  """One computed sentence per pre-registered contrast (primary metric), and MoS's equivalent LoRA rank."""
  if not results:
    return []
  out = []
  paired = {(c.a, c.b): c for c in results["paired"]}
  for c in results[PRIMARY]:
    check = paired.get((c.a, c.b))
    ratio = f"{math.exp(c.estimate):.3g}× [{math.exp(c.low):.3g}, {math.exp(c.high):.3g}], Holm p = {c.p_holm:.2g}"
    if check is not None:
      ratio += f" (paired check, {check.df} df: Holm p = {check.p_holm:.2g}" + (
          ", agrees)" if check.significant == c.significant else ", DISAGREES: the rows' noise differs)")
    step = STEP_NAMES.get((c.a, c.b))
    what = (f"adding {step} ({c.b} -> {c.a})" if step else f"{c.a} vs {c.b}")
    if not c.significant:
      verdict = "no difference the data can resolve"
    elif c.estimate < 0:
      verdict = f"{'it helps' if step else c.a + ' is better'}: lower fact NLL"
    else:
      verdict = f"{'it hurts' if step else c.a + ' is worse'}: higher fact NLL"
    out.append(f"- N = {n_facts}: {what}: fact NLL ratio {ratio}: {verdict}.")
  rank = equivalent_lora_rank(by_row)
  if rank is not None:
    out.append(f"- N = {n_facts}: {MOS} sits at an equivalent LoRA rank of {rank} on the LoRA curve (log fact NLL "
               "interpolated in log rank).")
  return out


def long_runs_lines(records: Sequence[dict], setup: Setup, by_row: dict[str, list[dict]]) -> list[str]:
  """The long runs against their row's normal run at the same seed: capacity or learning speed."""
  mine = [r for r in records if r.get("setup_hash") == setup.setup_hash()]
  out = []
  for row in setup.long_rows:
    lr = chosen_lr(records, row, setup)
    long = [r for r in mine if r["row"] == row and r["steps"] == setup.long_factor * setup.steps and r["lr"] == lr]
    short = [r for r in by_row.get(row, []) if long and r["seed"] == long[-1]["seed"]]
    if long and short:
      lg, sh = long[-1], short[-1]
      out.append(f"- N = {setup.n_facts}, {row}, seed {lg['seed']}: {setup.steps} steps -> fact NLL "
                 f"{sh['fact_nll']:.3f}, acc. {sh['fact_acc']:.1%}, paraphrase acc. {sh['para_acc']:.1%}; "
                 f"{lg['steps']} steps -> fact NLL {lg['fact_nll']:.3f}, acc. {lg['fact_acc']:.1%}, paraphrase acc. "
                 f"{lg['para_acc']:.1%}.")
  mos = by_row.get(MOS, [])
  lora1 = [r for r in mine if r["row"] == "LoRA r=1" and r["steps"] > setup.steps]
  if mos and lora1:
    ref = np.mean([r["fact_nll"] for r in mos])
    short = lora1[-1]["fact_nll"] > ref
    out.append(f"- LoRA r=1 with {setup.long_factor}x the steps {'still short of' if short else 'reaches'} {MOS} at "
               f"{setup.steps} steps (fact NLL {lora1[-1]['fact_nll']:.3f} vs {ref:.3f}): "
               + ("capacity, not only learning speed, separates them." if short else
                  "the gap is at least partly learning speed."))
  return out


def total_runs(setup: Setup) -> int:
  """The runs of a complete table (its lr searches, seeds and long runs)."""
  search = 0 if setup.lr_from is not None else len(setup.lrs)
  return len(setup.rows) * (search + len(setup.seeds)) + len(setup.long_rows)


def budget_line(records: Sequence[dict], setups: Sequence[Setup]) -> str:
  mine = [r for r in records if any(r.get("setup_hash") == s.setup_hash() for s in setups)]
  total = sum(total_runs(s) for s in setups)
  seconds = sum(r["seconds"] for r in mine)
  loads = [r["load_before"] for r in mine if math.isfinite(r.get("load_before", math.nan))]
  return (f"Runs done: {len(mine)} of {total}; {seconds / 3600:.2f} h of training and scoring "
          f"(median load average at a run's start {np.median(loads) if loads else math.nan:.1f}).")


def report(records: Sequence[dict], setups: Sequence[Setup] = (MAIN, LARGE), *, plot: Path | None = PLOT) -> str:
  """The docs block: per setup the rows table, the contrasts, the verdicts, the long runs; and the plot."""
  parts, verdict_lines, points_main = [], [], []
  for setup in setups:
    by_row = analysed(records, setup)
    results = family_results(by_row, FAMILIES["main" if setup.rows == MAIN.rows else "large"])
    epochs = setup.steps * setup.batch_size / setup.n_facts
    lrs = (f"the lrs chosen at N = {setup.lr_from.n_facts}" if setup.lr_from is not None else
           f"lr grid {list(setup.lrs)} on tuning seed {setup.tuning_seed}")
    parts.append(f"**N = {setup.n_facts} facts**, {setup.steps} steps of {setup.batch_size} ({epochs:g} epochs), "
                 f"{lrs}, seeds {list(setup.seeds)}:\n\n"
                 + rows_table(records, setup, by_row) + "\n\n" + contrasts_table(results))
    verdict_lines += verdicts(results, by_row, setup.n_facts) + long_runs_lines(records, setup, by_row)
    if setup is setups[0]:
      points_main = [(row, rs[0]["trainable"], float(np.mean([r[PRIMARY] for r in rs])),
                      float(np.std([r[PRIMARY] for r in rs], ddof=1)) if len(rs) > 1 else math.nan)
                     for row, rs in by_row.items()]
  if plot is not None and points_main:
    metric_vs_params(points_main, plot, f"Gemma 3 270M, {setups[0].n_facts} made-up facts: fact NLL vs trainable "
                     "parameters (down_proj only)", xlabel="trainable parameters",
                     ylabel="fact NLL (nats, log scale; lower is better)",
                     curve=[f"LoRA r={r}" for r in LORA_RANKS], ylog=True)
  return "\n\n".join(parts) + "\n\n" + budget_line(records, setups) + "\n\n" + ("\n".join(verdict_lines) or
                                                                                "_No verdicts yet._")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from the JSONL")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 2 rows, 2 seeds, 3 steps, 64 facts (under runs/)")
  parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (a sitting)")
  parser.add_argument("--launch-minutes", type=float, default=None,
                      help="start no new run after this many minutes (the run under way finishes)")
  parser.add_argument("--results", type=Path, default=None,
                      help="the JSONL (default experiments/results/claim_capacity.jsonl)")
  parser.add_argument("--lock", default=LOCK, help="lock file held for each run ('' for none)")
  args = parser.parse_args(argv)
  setups = (QUICK,) if args.quick else (MAIN, LARGE)
  path = args.results or (QUICK_RESULTS if args.quick else RESULTS)
  if not args.report:
    if args.quick and args.results is None and path.exists():
      path.unlink()  # a smoke test starts from scratch
    start = time.perf_counter()
    made = run_missing(setups, path, max_runs=args.max_runs, lock=args.lock or None,
                       launch_minutes=args.launch_minutes)
    print(f"{made} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
  records, note = runs.load(path)
  if note:
    print(f"note: {note}")
  text = report(records, (QUICK,) if args.quick else (MAIN, LARGE),
                plot=PLOT if path == RESULTS else path.with_suffix(".png"))
  print(text)
  if path == RESULTS:
    print(f"{runs.update_block(DOCS, BLOCK, text, heading=DOCS_HEADING)}: {DOCS} block {BLOCK}")


if __name__ == "__main__":
  main()
