"""The paper's claim at small scale: MoS vs LoRA, pure sharing and ablations on SST-2 with MiniLM-L6.

Every row trains the same frozen MiniLM-L6 (all attention and MLP dense layers adapted) plus a
linear head, with the same lr grid, steps and seeds. Phase 1 runs every row on seed 0 at each
lr of the grid and keeps, per row, the lr with the best dev accuracy; phase 2 runs the other
seeds at that lr. Each finished run is appended to the JSONL, so an interrupted run resumes
where it stopped; `--report` turns the JSONL into the README table and the plot.

    .venv/bin/python -m experiments.sst2_claim            # runs what is missing, then reports
    .venv/bin/python -m experiments.sst2_claim --report   # table + plot from the JSONL only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from mos_jax import MoSConfig
from mos_jax.core import BERT_TARGETS
from experiments.lib.paths import REPO, RESULTS_DIR, default_data_dir
from experiments.lib.plots import accuracy_vs_params

RESULTS = RESULTS_DIR / "sst2_claim.jsonl"
README = REPO / "docs" / "results.md"  # the results page holds the tables between markers


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
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_missing(claim: ClaimConfig, data_dir: str | None, path: Path) -> None:
  from experiments.lib.classification import train
  from experiments.lib.config import TrainConfig
  from experiments.lib.minilm import load_minilm
  from experiments.lib.sentiment_data import load_datasets
  from experiments.sst2_demo import DemoConfig

  model, tokenizer = load_minilm()
  demo = DemoConfig(max_train=claim.max_train, max_len=claim.max_len)
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
    print(json.dumps(record), flush=True)
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")

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
  results = load_results(path)
  lines = ["| row | trainable | lr | dev accuracy (mean ± std) | seeds | step ms |",
           "|---|---:|---:|---:|---:|---:|"]
  points = []
  for name in rows():
    if not any(r["row"] == name and r["seed"] == claim.seeds[0] for r in results):
      continue
    lr = best_lr(results, name, claim.seeds[0])
    runs = [r for r in results if r["row"] == name and r["lr"] == lr]
    acc = np.array([r["dev_accuracy"] for r in runs])
    std = acc.std(ddof=1) if len(acc) > 1 else float("nan")
    lines.append(f"| {name} | {runs[0]['trainable']:,} | {lr:g} | {100 * acc.mean():.2f} ± {100 * std:.2f} | "
                 f"{len(acc)} | {1000 * np.median([r['step_seconds'] for r in runs]):.0f} |")
    points.append((name, runs[0]["trainable"], 100 * acc.mean(), 100 * std))
  if results:
    lines.append(f"\nData: {results[0]['source']}; {results[0]['steps']} steps of batch "
                 f"{results[0]['batch_size']}; lr grid {list(claim.lrs)} searched on seed "
                 f"{claim.seeds[0]} for every row alike; dev = SST-2 dev (872 sentences) or the "
                 "generated held-out split.")
  table = "\n".join(lines)
  accuracy_vs_params(points, path.with_suffix(".png"), "MiniLM-L6 on SST-2: accuracy vs trainable parameters")
  return table


def update_readme(table: str) -> None:
  text = README.read_text()
  start, end = "<!-- sst2-claim:start -->", "<!-- sst2-claim:end -->"
  if start in text:
    text = re.sub(f"{start}.*?{end}", lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
    README.write_text(text)


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
    update_readme(table)


if __name__ == "__main__":
  main()
