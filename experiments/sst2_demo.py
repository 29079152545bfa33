"""`make demo-minilm`: fine-tune pretrained MiniLM-L6 with MoS on sentiment.

Data: SST-2 from --data-dir (default: $MOS_DATA_DIR, else ../shared/data/sst2 beside the
repo when present), else GLUE SST-2 from HF `datasets` with --allow-network, else a
compositional sentiment set the project generates (held-out sentence frames for eval).
Trains MoS (r=6 at LoRA-1's budget) and the head-only floor on the same data, then prints
a results table and where the plot, metrics and adapter files are.

    .venv/bin/python -m experiments.sst2_demo [--data-dir DIR] [--steps N] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import mos_jax
from experiments.lib import cli
from experiments.lib.classification import SST2Config as DemoConfig, train
from experiments.lib.config import TrainConfig
from experiments.lib.minilm import load_minilm
from experiments.lib.paths import default_data_dir
from experiments.lib.sentiment_data import load_datasets



def build_parser() -> argparse.ArgumentParser:
  """The command line (``--help`` lists every flag with its default)."""
  parser = cli.parser(__doc__)
  parser.add_argument("--data-dir", default=default_data_dir("sst2"), help="folder with train.tsv and dev.tsv")
  parser.add_argument("--allow-network", action="store_true", help="try HF datasets when no --data-dir")
  parser.add_argument("--generated", action="store_true", help="use the generated data set, not SST-2")
  parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps of each run")
  parser.add_argument("--out", default="runs/demo", help="output folder (one subfolder per run)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  demo = DemoConfig(steps=args.steps)

  start = time.perf_counter()
  model, tokenizer = load_minilm()
  data_dir = None if args.generated else args.data_dir
  train_data, dev_data, source = load_datasets(
      data_dir, tokenizer, max_len=demo.max_len, seed=demo.seed, n_generated=demo.n_generated,
      max_train=demo.max_train, allow_network=args.allow_network and not args.generated)
  print(f"data: {source}: {len(train_data)} train / {len(dev_data)} eval examples")
  runs = {"MoS r=6 r_e=1 l=2": demo.mos, "head only (frozen base)": None}
  results = {}
  for name, mos in runs.items():
    cfg = TrainConfig(mos=mos, lr=demo.lr, steps=demo.steps, batch_size=demo.batch_size,
                      eval_every=max(1, demo.steps // 5), seed=demo.seed, compute_dtype=demo.compute_dtype,
                      out_dir=os.path.join(args.out, "mos" if mos else "head_only"))
    results[name] = train(model, model.params, train_data, dev_data, cfg, name=name)
    if mos is not None:
      print(mos_jax.summary(results[name]["adapter"]))

  print(f"\n{'run':<26} {'trainable':>10} {'eval acc':>9} {'step ms':>8}")
  for name, r in results.items():
    print(f"{name:<26} {r['trainable']:>10,} {r['final_accuracy']:>9.4f} {1000 * r['step_seconds']:>8.1f}")
  paths = results[next(iter(runs))]["paths"]
  print(f"\nplot: {paths['plot']}\nmetrics: {paths['metrics']}\nadapter: {paths['adapter']}"
        f"\n(head-only run under {os.path.join(args.out, 'head_only')}); total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  main()
