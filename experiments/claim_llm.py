"""The paper's claim on a real LLM: Gemma 3 270M instruction-tuned with MoS, LoRA, pure sharing and ablations.

Claims tested (MoS paper, ICLR 2025): (a) MoS at about 1/8 of LoRA's trainable parameters
matches LoRA; (b) pure sharing is worse, and each of MoS's four strategies (subset selection,
pair dissociation, vector sharding, shard privatization) contributes.

Every row adapts all attention and MLP projections of the same frozen Gemma 3 270M (18
layers, so at the budget of LoRA rank 1 MoS can use active rank 8 with l = 2: a public draw of
16 of 36 shards per layer) and is trained on the same task, steps, schedule and lr grid, with
the same seeds. The task is sentiment as an instruction (SST-2 review -> " positive" or
" negative", then <eos>), from ``../shared/data/sst2`` (``--data-dir``, ``$MOS_DATA_DIR``) or,
without it, the generated compositional sentiment set. Metrics, on held-out SST-2 dev reviews:

- primary: the mean NLL of the response tokens (continuous, so it separates rows whose
  accuracies tie);
- secondary: label accuracy, the right label word's first token scoring higher than the other's
  at the answer position (one forward, no generation).

Phase 1 runs every row on seed 0 at each lr of the grid and keeps, per row, the lr with the
lowest NLL on a validation split (64 dev reviews disjoint from the 160 reported); phase 2 runs
the other seeds at that lr. The frozen base is scored once, untrained. Each finished run is
appended to ``experiments/results/claim_llm.jsonl`` and skipped when the script runs again, so
the table can be built over several sittings; ``--report`` rewrites its block of ``docs/results.md`` and
``experiments/results/claim_llm.png`` from the JSONL alone.

    .venv/bin/python -m experiments.claim_llm                # runs what is missing, then reports
    .venv/bin/python -m experiments.claim_llm --max-runs 6   # a sitting: at most 6 runs, then reports
    .venv/bin/python -m experiments.claim_llm --report       # table + plot from the JSONL only
    .venv/bin/python -m experiments.claim_llm --quick        # smoke test: every row, 2 steps (~5 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

import mos_jax
from mos_jax import MoSConfig
from mos_jax.nnx import GEMMA3_TARGETS
from experiments.lib import gemma3_weights, instruct, runs
from experiments.lib.config import TrainConfig
from experiments.lib.paths import REPO, RESULTS_DIR, default_data_dir
from experiments.lib.plots import metric_vs_params
from experiments.lib.sentiment_data import get_data

RESULTS = RESULTS_DIR / "claim_llm.jsonl"
QUICK_RESULTS = REPO / "runs" / "claim_llm_quick" / "claim_llm.jsonl"

PROMPT = "Review: {text}\nSentiment (positive or negative):"
LABELS = ("negative", "positive")  # SST-2's 0 and 1
BASE_ROW = "frozen base (no training)"


@dataclasses.dataclass(frozen=True)
class ClaimConfig:
  """The table's settings, the same for every row.

  Sized for 2 CPU cores (see the README section): a training step of Gemma 3 270M at batch 8
  and 40 tokens takes ~2 s there (other jobs sharing the cores) and a whole run (adapt,
  compile, 40 steps, score val + test) 80-120 s, so the 45 training runs (9 rows x (3 lrs + 2
  more seeds)) and the base fit in 90 minutes. The grid spans 10x because the rows' best lrs
  differ (the term is scaled by alpha / r, and a shared shard moves many layers at once); on
  seed 0, LoRA r=8 collapsed to one label at 5e-3.
  """

  lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # searched on seeds[0] for every row alike
  seeds: tuple[int, ...] = (0, 1, 2)
  steps: int = 40
  batch_size: int = 8
  seq_len: int = 40            # <bos> prompt response <eos>; longer reviews are left out
  response_len: int = 2        # the label word and <eos>
  warmup_frac: float = 0.1
  clip_norm: float = 1.0
  rank: int = 8                # LoRA's larger rank, and MoS's active rank at r_e = 1
  shards_per_vector: int = 2   # l
  alpha: float = 16.0          # the paper's; the term is scaled by alpha / r
  train_pool: int = 4000       # training reviews: a fixed random subset of SST-2 train
  val_size: int = 64           # dev reviews that choose the lr
  test_size: int = 160         # other dev reviews, reported
  eval_batch: int = 32
  data_seed: int = 0           # the training subset and the val/test split, not the run seed

  def __post_init__(self):
    if self.val_size % self.eval_batch or self.test_size % self.eval_batch:
      raise ValueError(f"val_size and test_size must be multiples of eval_batch={self.eval_batch}")

  def setup_hash(self) -> str:
    """A hash of what makes runs comparable: every field except the lr grid and the seeds.

    Adding a seed or an lr keeps the finished runs; changing steps, data or sizes starts over.
    """
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("lrs", "seeds")}
    return _hash({"claim": fields, "prompt": PROMPT, "labels": LABELS})


QUICK = ClaimConfig(lrs=(5e-3,), seeds=(0,), steps=2, train_pool=200, val_size=8, test_size=16, eval_batch=8)


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def rows(claim: ClaimConfig, num_layers: int) -> dict[str, MoSConfig | None]:
  """The table's rows, in order; ``None`` is the untrained base.

  Args:
    claim: the settings (``rank``, ``shards_per_vector``, ``alpha``).
    num_layers: ``L``, layers per module type (18 for Gemma 3 270M): pure sharing uses rank
      ``r_e·L``.

  Returns:
    Row name -> config. MoS at r_e = 1 and LoRA r=1 have the same trainable count as pure
    sharing; shard privatization needs r_e >= 2, so it is ablated at r_e = 2 with the same
    ratio of active rank to budget (r = rank·r_e) as the main MoS row.
  """
  # No dropout (the paper uses 0.1): 40 steps cannot overfit, so it would only add noise to the comparison.
  common = dict(alpha=claim.alpha, dropout=0.0, target_modules=GEMMA3_TARGETS)
  r, l = claim.rank, claim.shards_per_vector
  mos = MoSConfig(rank=r, equivalent_rank=1, private_rank=0, shards_per_vector=l, **common)
  mos2 = MoSConfig(rank=2 * r, equivalent_rank=2, private_rank=1, shards_per_vector=l, **common)
  return {
      f"LoRA r={r}": MoSConfig.lora(r, **common),
      "LoRA r=1": MoSConfig.lora(1, **common),
      reference_row(claim): mos,
      f"pure sharing r_e=1 (r={num_layers})": MoSConfig.pure_sharing(1, num_layers=num_layers, **common),
      "MoS - subset selection": dataclasses.replace(mos, subset_selection=False),
      "MoS - pair dissociation": dataclasses.replace(mos, pair_dissociation=False),
      "MoS - vector sharding": dataclasses.replace(mos, vector_sharding=False),
      f"MoS r={2 * r} r_e=2 r_p=1 l={l}": mos2,
      "MoS r_e=2 - shard privatization": dataclasses.replace(mos2, shard_privatization=False),
      BASE_ROW: None,
  }


def reference_row(claim: ClaimConfig) -> str:
  """The full MoS row every other row is compared with."""
  return f"MoS r={claim.rank} r_e=1 l={claim.shards_per_vector}"


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Encoded splits (:mod:`experiments.lib.instruct` batches), the label words' token ids, the source."""

  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  choice_ids: np.ndarray
  source: str


def load_task(tokenizer: Any, claim: ClaimConfig, data_dir: str | None) -> TaskData:
  """SST-2 (or the generated sentiment set) as instruction pairs, split into train / val / test.

  Args:
    tokenizer: the model's tokenizer.
    claim: sizes, lengths and the data seed.
    data_dir: a folder with SST-2's ``train.tsv``/``dev.tsv``; ``None`` for generated data.

  Returns:
    The splits. Val and test are disjoint draws from the dev split (held out from training),
    of reviews that fit ``seq_len``.

  Raises:
    ValueError: too few dev reviews fit for val + test, or a label word's first token is
      shared (the accuracy would be undefined).
  """
  splits = get_data(data_dir, seed=claim.data_seed, n_train=claim.train_pool,
                    n_eval=4 * (claim.val_size + claim.test_size), max_train=claim.train_pool)

  def encode(texts: Sequence[str], labels: Sequence[int]) -> dict[str, np.ndarray]:
    labels = [int(y) for y in labels]
    return instruct.encode_pairs(tokenizer, [PROMPT.format(text=t) for t in texts], [LABELS[y] for y in labels],
                                 labels, seq_len=claim.seq_len, response_len=claim.response_len)[0]

  train = encode(*splits["train"])
  dev_texts, dev_labels = splits["dev"]
  order = np.random.default_rng(claim.data_seed).permutation(len(dev_texts))
  dev = encode([dev_texts[i] for i in order], [dev_labels[i] for i in order])
  need = claim.val_size + claim.test_size
  if instruct.size(dev) < need:
    raise ValueError(f"only {instruct.size(dev)} dev reviews fit seq_len={claim.seq_len}; need {need}")
  choice_ids = np.asarray([tokenizer.encode(" " + w, bos=False)[0] for w in LABELS], np.int32)
  if len(set(choice_ids.tolist())) != len(LABELS):
    raise ValueError(f"the label words {LABELS} share their first token")
  return TaskData(train=train, val=instruct.take(dev, np.arange(claim.val_size)),
                  test=instruct.take(dev, np.arange(claim.val_size, need)), choice_ids=choice_ids,
                  source=splits["source"])


# ----------------------------------------------------------------------------------------------
# One run.


def evaluate_base(model: Any, data: TaskData, claim: ClaimConfig) -> dict[str, Any]:
  """Scores of the untrained model: the floor every adapter should clear."""
  graphdef, state = nnx.split(model)
  sums = jax.jit(lambda state, batch: instruct.score_sums(nnx.merge(graphdef, state), batch, data.choice_ids))
  start = time.perf_counter()
  scores = {split: instruct.metrics(lambda b: sums(state, b), getattr(data, split), claim.eval_batch)
            for split in ("val", "test")}
  return {"trainable": 0, "scores": scores, "seconds": time.perf_counter() - start}


def train_and_evaluate(model: Any, mos: MoSConfig, data: TaskData, claim: ClaimConfig, *, lr: float, seed: int,
                       name: str) -> dict[str, Any]:
  """Adapts ``model`` with ``mos`` (seeded by ``seed``), trains it and scores it on val and test.

  The batches depend only on ``seed`` and the step, so every row sees the same examples in the
  same order at a given seed (the pairing of the comparison).

  Returns:
    ``trainable`` (the adapter's parameter count), ``base_params``, ``scores`` (``val`` and
    ``test``: see :func:`experiments.lib.instruct.metrics`), ``train_loss_end`` (the mean of
    the last quarter of the training losses), ``step_seconds`` (median, after compilation),
    ``compile_seconds`` (the first step) and ``seconds`` (the whole run).
  """
  start = time.perf_counter()
  n_train = instruct.size(data.train)

  def next_batch(step: int) -> tuple[dict[str, np.ndarray], int]:
    idx = np.random.default_rng([seed, step]).choice(n_train, claim.batch_size, replace=False)
    return instruct.take(data.train, idx), claim.batch_size

  with tempfile.TemporaryDirectory(prefix="claim_llm_") as out_dir:
    cfg = TrainConfig(mos=dataclasses.replace(mos, seed=seed), lr=lr, steps=claim.steps, batch_size=claim.batch_size,
                      warmup_frac=claim.warmup_frac, clip_norm=claim.clip_norm, eval_every=claim.steps, seed=seed,
                      out_dir=out_dir, progress=False)
    # Scored once after training (below), not during it: evaluation costs as much as ~10 steps.
    result = instruct.train_adapter(model, next_batch, cfg, name=name)
  trained = result["adapter"]
  sums = instruct.scorer(result, data.choice_ids)
  scores = {split: instruct.metrics(sums, getattr(data, split), claim.eval_batch) for split in ("val", "test")}
  losses = [m["loss"] for m in result["metrics"]]
  return {"trainable": mos_jax.core.trainable_count(trained.config, trained.groups),
          "base_params": trained.base_params, "scores": scores,
          "train_loss_end": float(np.mean(losses[-max(1, len(losses) // 4):])),
          "step_seconds": result["step_seconds"],
          "compile_seconds": claim.batch_size / result["metrics"][0]["examples_per_s"],
          "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# The table: which runs, in which order, resumably.


def make_record(name: str, mos: MoSConfig | None, claim: ClaimConfig, source: str, *, lr: float | None,
                seed: int | None, num_layers: int, result: dict[str, Any]) -> dict[str, Any]:
  """A self-describing JSONL record: the row, its config and hashes, the settings, the scores."""
  config = None if mos is None else dataclasses.asdict(dataclasses.replace(mos, seed=seed))
  scores = result["scores"]
  record = {"row": name, "seed": seed, "lr": lr, "trainable": result["trainable"],
            "config": config, "config_hash": _hash({"config": config, "setup": claim.setup_hash(), "source": source}),
            "setup_hash": claim.setup_hash(), "source": source,
            "steps": 0 if mos is None else claim.steps, "batch_size": claim.batch_size, "seq_len": claim.seq_len,
            "num_layers": num_layers}
  for split in ("val", "test"):
    record.update({f"{split}_{k}": v for k, v in scores[split].items()})
  record.update({k: result[k] for k in ("base_params", "train_loss_end", "step_seconds", "compile_seconds")
                 if k in result})
  record.update({"seconds": result["seconds"], "time": time.strftime("%Y-%m-%d %H:%M:%S")})
  return record


def select(records: list[dict], claim: ClaimConfig, source: str | None = None) -> list[dict]:
  """The records of this setup (and data source, if given) at the grid's lrs."""
  return [r for r in records if r.get("setup_hash") == claim.setup_hash()
          and (source is None or r["source"] == source) and (r["lr"] is None or r["lr"] in claim.lrs)]


def best_lr(records: list[dict], name: str, claim: ClaimConfig) -> float | None:
  """The lr of the row's seeds[0] run with the lowest validation NLL; ``None`` before any ran."""
  tried = [r for r in records if r["row"] == name and r["seed"] == claim.seeds[0] and r["lr"] is not None]
  return min(tried, key=lambda r: r["val_nll"])["lr"] if tried else None


def plan(records: list[dict], claim: ClaimConfig, names: Sequence[str]) -> list[tuple[str, float | None, int | None]]:
  """The runs still missing, in order: the base, then every row's lr search, then the other seeds.

  A row's later seeds appear only once its lr search is complete (its lr is known).
  """
  done = {(r["row"], r["lr"], r["seed"]) for r in records}
  todo: list[tuple[str, float | None, int | None]] = []
  if BASE_ROW in names and (BASE_ROW, None, None) not in done:
    todo.append((BASE_ROW, None, None))
  trained = [n for n in names if n != BASE_ROW]
  todo += [(n, lr, claim.seeds[0]) for n in trained for lr in claim.lrs if (n, lr, claim.seeds[0]) not in done]
  for n in trained:
    if all((n, lr, claim.seeds[0]) in done for lr in claim.lrs):
      lr = best_lr(records, n, claim)
      todo += [(n, lr, s) for s in claim.seeds[1:] if (n, lr, s) not in done]
  return todo


def run_missing(claim: ClaimConfig, path: Path, *, data_dir: str | None, only: Sequence[str] | None = None,
                max_runs: int | None = None, load: Callable[[], tuple[Any, Any]] | None = None) -> int:
  """Runs what the table still lacks and appends each finished run to ``path``.

  Args:
    claim: the settings.
    path: the JSONL.
    data_dir: SST-2's folder; ``None`` for generated data.
    only: row names to run (default: all).
    max_runs: stop after this many runs (a sitting); ``None`` for all.
    load: returns ``(model, tokenizer)``; default: the real Gemma 3 270M.

  Returns:
    How many runs were made.
  """
  model, tokenizer = (load or gemma3_weights.load_gemma3_270m)()
  data = load_task(tokenizer, claim, data_dir)
  table = rows(claim, model.config.num_layers)
  names = [n for n in table if only is None or n in only]
  unknown = set(only or ()) - set(table)
  if unknown:
    raise ValueError(f"unknown rows {sorted(unknown)}; the rows are {list(table)}")
  print(f"data: {data.source}: {len(data.train['tokens'])} train / {claim.val_size} val / {claim.test_size} test "
        f"examples; {claim.steps} steps of {claim.batch_size}; setup {claim.setup_hash()}", flush=True)
  made = 0
  while max_runs is None or made < max_runs:
    records, note = runs.load(path)
    if note:
      print(f"note: {note}", flush=True)
    todo = plan(select(records, claim, data.source), claim, names)
    if not todo:
      break
    name, lr, seed = todo[0]
    mos = table[name]
    if mos is None:
      result = evaluate_base(model, data, claim)
    else:
      result = train_and_evaluate(model, mos, data, claim, lr=lr, seed=seed, name=name)
    record = make_record(name, mos, claim, data.source, lr=lr, seed=seed, num_layers=model.config.num_layers,
                         result=result)
    runs.append(path, record)
    made += 1
    print(f"[{made}] {name} lr={lr} seed={seed}: test NLL {record['test_nll']:.4f}, accuracy "
          f"{record['test_accuracy']:.1%}, val NLL {record['val_nll']:.4f} ({record['seconds']:.0f} s; "
          f"{len(todo) - 1} runs left after this)", flush=True)
  return made


# ----------------------------------------------------------------------------------------------
# The report.

DOCS = REPO / "docs" / "results.md"
BLOCK = "claim-llm"
DOCS_HEADING = "A format task: SST-2 as an instruction on Gemma 3 270M (no row separates)"


def analysis_seeds(claim: ClaimConfig) -> tuple[int, ...]:
  """The seeds the statistics use: all but ``seeds[0]``, whose validation NLL chose the lr (winner's curse)."""
  return claim.seeds[1:]


def chosen_runs(records: list[dict], claim: ClaimConfig, names: Sequence[str]) -> dict[str, list[dict]]:
  """Per trained row, its runs at the chosen lr on :func:`analysis_seeds`, by seed."""
  out = {}
  for name in names:
    lr = best_lr(records, name, claim)
    runs_ = {r["seed"]: r for r in records
             if name != BASE_ROW and r["row"] == name and lr is not None and r["lr"] == lr
             and r["seed"] in analysis_seeds(claim)}
    if runs_:
      out[name] = [runs_[s] for s in sorted(runs_)]
  return out


def table_markdown(records: list[dict], claim: ClaimConfig, names: Sequence[str]) -> str:
  """The docs table (rows x seeds model, pooled error, Holm over every row vs MoS), its footnote, the verdicts."""
  ref = reference_row(claim)
  by_row = chosen_runs(records, claim, names)
  flat = [r for rs in by_row.values() for r in rs]
  pairs = [(n, ref) for n in by_row if n != ref]
  enough = ref in by_row and len({r["seed"] for r in flat}) >= 2 and len(by_row) >= 2
  fams = {m: {c.a: c for c in runs.contrasts(runs.values_of(flat, m), pairs, rows=list(by_row))} if enough else {}
          for m in ("test_nll", "test_accuracy")}
  lines = ["| row | trainable | lr | held-out NLL | Δ NLL vs MoS [95% CI] | Holm p | label accuracy % | "
           "Δ accuracy vs MoS (points) [95% CI] | Holm p | seeds |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name in names:
    if name == BASE_ROW:
      base = [r for r in records if r["row"] == BASE_ROW]
      if base:
        lines.append(f"| {name} | 0 | - | {base[-1]['test_nll']:.4f} | | | {100 * base[-1]['test_accuracy']:.1f} "
                     "| | | - |")
      continue
    rs = by_row.get(name)
    if not rs:
      continue
    cells = []
    for m, scale, digits in (("test_nll", 1.0, 4), ("test_accuracy", 100.0, 1)):
      c = fams[m].get(name)
      mean = runs.mean_sd([r[m] for r in rs], scale, digits)
      cells += [mean, "(reference)" if name == ref else runs.effect_cell(c, scale, digits) if c else "n/a",
                "" if c is None else f"{c.p_holm:.2g}"]
    lines.append(f"| {name} | {rs[0]['trainable']:,} | {rs[0]['lr']:g} | " + " | ".join(cells) + f" | {len(rs)} |")
  trained = [n for n in names if n != BASE_ROW]
  expected = (1 if BASE_ROW in names else 0) + len(trained) * (len(claim.lrs) + len(claim.seeds) - 1)
  done = len({(r["row"], r["lr"], r["seed"]) for r in records if r["row"] in names})
  df = next(iter(fams["test_nll"].values())).df if fams["test_nll"] else 0
  source = Path(records[0]["source"].split(":")[-1]).name if records else "-"
  lines.append(
      f"\nData: `{source}`; prompt `{PROMPT!r}`, "
      f"response \" negative\"/\" positive\" + <eos>; {claim.steps} steps of batch {claim.batch_size} at "
      f"{claim.seq_len} tokens, AdamW, linear decay, {claim.warmup_frac:.0%} warmup, clip {claim.clip_norm}, alpha "
      f"{claim.alpha:g}, no dropout; lr grid {list(claim.lrs)} searched on seed {claim.seeds[0]} (lowest NLL on "
      f"{claim.val_size} validation reviews); NLL = mean over the response tokens of {claim.test_size} other held-out "
      f"dev reviews. Statistics on seeds {list(analysis_seeds(claim))} only (seed {claim.seeds[0]} chose the lr, so "
      f"its runs are biased in their row's favour): a rows x seeds model with the pooled residual error ({df} df), "
      f"every row minus MoS, Holm-corrected over the {len(pairs)} contrasts per metric; **bold** survives at 5%. "
      f"Runs done: {done} of {expected}.")
  verdict = []
  for c in fams["test_nll"].values():
    what = "no difference the data can resolve" if not c.significant else (
        "better than MoS" if c.estimate < 0 else "worse than MoS")
    verdict.append(f"- {c.a} minus MoS: Δ NLL {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}], Holm p = "
                   f"{c.p_holm:.2g}: {what}.")
  return "\n".join(lines) + "\n\n" + ("\n".join(verdict) or "_Verdicts need MoS and another row on 2 seeds._")


def report(claim: ClaimConfig, path: Path, *, plot: Path | None = None) -> str:
  """Table, verdicts and plot (``plot``, default beside the JSONL) from the JSONL alone: no model, no data."""
  records, note = runs.load(path)
  if note:
    print(f"note: {note}")
  sources = [r["source"] for r in records if r.get("setup_hash") == claim.setup_hash()]
  # One table per data source: the most recent one when runs of several exist.
  records = select(records, claim, sources[-1] if sources else None)
  # Row names depend on L (pure sharing's rank); the records carry it (Gemma 3 270M: 18).
  names = list(rows(claim, records[-1].get("num_layers", 18) if records else 18))
  text = table_markdown(records, claim, names)
  points = [(n, rs[0]["trainable"], float(np.mean([r["test_nll"] for r in rs])),
             float(np.std([r["test_nll"] for r in rs], ddof=1)) if len(rs) > 1 else math.nan)
            for n, rs in chosen_runs(records, claim, names).items()]
  base = [r for r in records if r["row"] == BASE_ROW]
  metric_vs_params(points, plot or path.with_suffix(".png"),
                   "Gemma 3 270M, sentiment as an instruction: held-out response NLL vs trainable parameters",
                   xlabel="trainable parameters", ylabel="held-out response NLL (nats/token, lower is better)",
                   baseline=(BASE_ROW, base[-1]["test_nll"]) if base else None)
  return text


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data-dir", default=None, help="SST-2 folder (default: $MOS_DATA_DIR/sst2 or ../shared/data/sst2)")
  parser.add_argument("--generated", action="store_true", help="use the generated sentiment set, not SST-2")
  parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from the JSONL")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: every row, 1 seed, 1 lr, 2 steps, tiny eval; results under runs/")
  parser.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows")
  parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (a sitting)")
  parser.add_argument("--results", type=Path, default=None, help=f"the JSONL (default {RESULTS.relative_to(REPO)})")
  args = parser.parse_args(argv)
  claim = QUICK if args.quick else ClaimConfig()
  path = args.results or (QUICK_RESULTS if args.quick else RESULTS)
  if not args.report:
    if args.quick and args.results is None and path.exists():
      path.unlink()  # a smoke test starts from scratch
    data_dir = None if args.generated else (args.data_dir or default_data_dir("sst2"))
    start = time.perf_counter()
    made = run_missing(claim, path, data_dir=data_dir, only=args.only, max_runs=args.max_runs)
    print(f"{made} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
  text = report(claim, path)
  print(text)
  if path == RESULTS:
    print(f"{runs.update_block(DOCS, BLOCK, text, heading=DOCS_HEADING)}: {DOCS} block {BLOCK}")


if __name__ == "__main__":
  main()
