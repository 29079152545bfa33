"""The paper's claim at small scale: MoS vs LoRA, pure sharing and ablations on SST-2 with MiniLM-L6.

Every row trains the same frozen MiniLM-L6 (all attention and MLP dense layers adapted) plus a
linear head, with the same lr grid, steps and seeds. Phase 1 runs every row on seed 0 at each
lr of the grid and keeps, per row, the lr with the best dev accuracy; phase 2 runs the other
seeds at that lr. Each finished run is appended to the JSONL (:mod:`experiments.lib.runs`), so an
interrupted run resumes where it stopped; `--report` turns the JSONL into its block of
``docs/results.md`` and the plot. The statistics leave out seed 0 (it chose the lr); the lr is
still chosen on the dev set that is reported, which only a rerun with a separate validation split
can fix.

    .venv/bin/python -m experiments.sst2_claim            # runs what is missing, then reports
    .venv/bin/python -m experiments.sst2_claim --report   # table + plot from the JSONL only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

from mos_jax import MoSConfig
from mos_jax.core import BERT_TARGETS
from experiments.lib import runs
from experiments.lib.paths import REPO, RESULTS_DIR, default_data_dir
from experiments.lib.plots import accuracy_vs_params

RESULTS = RESULTS_DIR / "sst2_claim.jsonl"
DOCS = REPO / "docs" / "results.md"
BLOCK = "sst2-claim"
DOCS_HEADING = "MiniLM-L6 on SST-2 (a short fine-tune: no row separates)"
REFERENCE = "MoS r=6 r_e=1 l=2"


@dataclasses.dataclass(frozen=True)
class ClaimConfig:
  lrs: tuple[float, ...] = (1e-3, 3e-3)
  seeds: tuple[int, ...] = (0, 1, 2)
  steps: int = 150
  batch_size: int = 16
  max_train: int = 20_000
  max_len: int = 64


def rows() -> dict[str, MoSConfig | None]:
  """MiniLM-L6 has L = 6 layers per type, so at r_e = 1 the active rank is at most 6."""
  common = dict(alpha=16.0, dropout=0.1, target_modules=BERT_TARGETS)
  mos = MoSConfig(rank=6, equivalent_rank=1, private_rank=0, shards_per_vector=2, **common)
  mos2 = MoSConfig(rank=7, equivalent_rank=2, private_rank=1, shards_per_vector=2, **common)
  return {
      "LoRA r=8": MoSConfig.lora(8, **common),
      "LoRA r=1": MoSConfig.lora(1, **common),
      "MoS r=6 r_e=1 l=2": mos,
      "pure sharing r_e=1 (r=6)": MoSConfig.pure_sharing(1, num_layers=6, **common),
      "MoS r_e=1 - subset selection": dataclasses.replace(mos, subset_selection=False),
      "MoS r_e=1 - pair dissociation": dataclasses.replace(mos, pair_dissociation=False),
      "MoS r_e=1 - vector sharding": dataclasses.replace(mos, vector_sharding=False),
      "MoS r=7 r_e=2 r_p=1 l=2": mos2,
      "MoS r_e=2 - shard privatization": dataclasses.replace(mos2, shard_privatization=False),
      "head only (frozen base)": None,
  }


def load_results(path: Path) -> list[dict]:
  records, note = runs.load(path)
  if note:
    print(f"note: {note}")
  return records


def run_missing(claim: ClaimConfig, data_dir: str | None, path: Path) -> None:
  from experiments.lib.classification import SST2Config, train
  from experiments.lib.config import TrainConfig
  from experiments.lib.minilm import load_minilm
  from experiments.lib.sentiment_data import load_datasets

  model, tokenizer = load_minilm()
  demo = SST2Config(max_train=claim.max_train, max_len=claim.max_len)
  train_data, dev_data, source = load_datasets(data_dir, tokenizer, max_len=demo.max_len, seed=demo.seed,
                                               n_generated=demo.n_generated, max_train=demo.max_train)
  print(f"data: {source}: {len(train_data)} train / {len(dev_data)} dev")
  path.parent.mkdir(parents=True, exist_ok=True)

  def run(name: str, mos: MoSConfig | None, lr: float, seed: int) -> None:
    done = {(r["row"], r["lr"], r["seed"]) for r in load_results(path)}
    if (name, lr, seed) in done:
      return
    if mos is not None:
      mos = dataclasses.replace(mos, seed=seed)
    with tempfile.TemporaryDirectory(prefix="claim_") as out_dir:
      cfg = TrainConfig(mos=mos, lr=lr, steps=claim.steps, batch_size=claim.batch_size,
                        eval_every=claim.steps, seed=seed, progress=False, out_dir=out_dir)
      result = train(model, model.params, train_data, dev_data, cfg, name=name)
    record = {"row": name, "lr": lr, "seed": seed, "dev_accuracy": result["final_accuracy"],
              "trainable": result["trainable"], "step_seconds": result["step_seconds"],
              "source": source, "steps": claim.steps, "batch_size": claim.batch_size}
    print(record, flush=True)
    runs.append(path, record)

  for name, mos in rows().items():
    for lr in claim.lrs:
      run(name, mos, lr, claim.seeds[0])
  for name, mos in rows().items():
    for seed in claim.seeds[1:]:
      run(name, mos, best_lr(load_results(path), name, claim.seeds[0]), seed)


def best_lr(results: list[dict], name: str, seed: int) -> float:
  tried = [r for r in results if r["row"] == name and r["seed"] == seed]
  return max(tried, key=lambda r: r["dev_accuracy"])["lr"]


def report(claim: ClaimConfig, path: Path) -> str:
  """The table (seeds after the first; rows x seeds model, pooled error, Holm over every row vs MoS) and the plot."""
  results = load_results(path)
  by_row = {}
  for name in rows():
    if not any(r["row"] == name and r["seed"] == claim.seeds[0] for r in results):
      continue
    lr = best_lr(results, name, claim.seeds[0])
    chosen = {r["seed"]: r for r in results if r["row"] == name and r["lr"] == lr and r["seed"] in claim.seeds[1:]}
    if chosen:
      by_row[name] = [chosen[s] for s in sorted(chosen)]
  flat = [r for rs in by_row.values() for r in rs]
  pairs = [(n, REFERENCE) for n in by_row if n != REFERENCE]
  enough = REFERENCE in by_row and len(by_row) > 1 and len({r["seed"] for r in flat}) > 1
  fam = {c.a: c for c in runs.contrasts(runs.values_of(flat, "dev_accuracy"), pairs, rows=list(by_row))} if enough \
      else {}
  lines = ["| row | trainable | lr | dev accuracy % | Δ vs MoS (points) [95% CI] | Holm p | seeds | step ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  points = []
  for name, rs in by_row.items():
    acc = [r["dev_accuracy"] for r in rs]
    c = fam.get(name)
    delta = "(reference)" if name == REFERENCE else runs.effect_cell(c, 100, 2) if c else "n/a"
    lines.append(f"| {name} | {rs[0]['trainable']:,} | {rs[0]['lr']:g} | {runs.mean_sd(acc, 100, 2)} | {delta} | "
                 f"{'' if c is None else f'{c.p_holm:.2g}'} | {len(rs)} | "
                 f"{1000 * np.median([r['step_seconds'] for r in rs]):.0f} |")
    points.append((name, rs[0]["trainable"], 100 * float(np.mean(acc)),
                   100 * float(np.std(acc, ddof=1)) if len(acc) > 1 else math.nan))
  if results:
    df = next(iter(fam.values())).df if fam else 0
    lines.append(f"\nData: {Path(results[0]['source'].split(':')[-1]).name}; {results[0]['steps']} steps of batch "
                 f"{results[0]['batch_size']}; lr grid {list(claim.lrs)} searched on seed {claim.seeds[0]} for every "
                 "row alike by the accuracy on the same dev set that is reported (SST-2 dev, 872 sentences): a "
                 f"selection bias only a rerun with a separate validation split removes. Statistics on seeds "
                 f"{list(claim.seeds[1:])} (seed {claim.seeds[0]} chose the lr): a rows x seeds model with the pooled "
                 f"residual error ({df} df), every row minus MoS, Holm-corrected over {len(pairs)} contrasts; "
                 "**bold** survives at 5%.")
  accuracy_vs_params(points, path.with_suffix(".png"), "MiniLM-L6 on SST-2: accuracy vs trainable parameters")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data-dir", default=None, help="SST-2 folder (default as in experiments.sst2_demo)")
  parser.add_argument("--report", action="store_true", help="only build the table and plot")
  parser.add_argument("--results", type=Path, default=RESULTS)
  args = parser.parse_args()
  claim = ClaimConfig()
  if not args.report:
    run_missing(claim, args.data_dir or default_data_dir("sst2"), args.results)
  table = report(claim, args.results)
  print(table)
  if args.results == RESULTS:
    print(f"{runs.update_block(DOCS, BLOCK, table, heading=DOCS_HEADING)}: {DOCS} block {BLOCK}")


if __name__ == "__main__":
  main()
