"""Smallest end-to-end MoS fine-tune: a tiny random Llama learns a fixed sequence task.

Trains the same frozen base three ways (LoRA r=8, MoS r=8 at LoRA-1's budget, frozen)
and prints the final loss and trainable parameters of each:

    .venv/bin/python -m experiments.tiny_llama_demo [--steps N] [--layers L] [--lr LR]
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib import cli
from experiments.lib.models import random_llama

STEPS, LAYERS, LR = 150, 8, 3e-3


def build_parser() -> argparse.ArgumentParser:
  """The command line (``--help`` lists every flag with its default)."""
  p = cli.parser(__doc__)
  p.add_argument("--steps", type=int, default=STEPS, help="training steps of each run")
  p.add_argument("--layers", type=int, default=LAYERS,
                 help="decoder layers of the random Llama (at least 8: MoS r=8 at LoRA-1's budget draws 8 of L vectors)")
  p.add_argument("--lr", type=float, default=LR, help="peak learning rate (AdamW, warmup over up to 10 steps, cosine decay)")
  return p


def make_batch(seed: int = 0) -> jax.Array:
  # Sequences of an arithmetic progression mod the vocabulary: learnable from context.
  rng = np.random.default_rng(seed)
  start, stride = rng.integers(0, 64, (32, 1)), rng.integers(1, 5, (32, 1))
  return jnp.asarray((start + stride * np.arange(16)) % 64, jnp.int32)


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  if args.steps < 1 or args.layers < 8 or not args.lr > 0:
    raise SystemExit(f"--steps must be at least 1, --layers at least 8 and --lr positive; got {args.steps}, "
                     f"{args.layers}, {args.lr}")
  model = random_llama(vocab=64, hidden=64, intermediate=128, layers=args.layers, heads=4, kv_heads=2,
                       max_positions=32)
  ids = make_batch()

  def loss_fn(params, batch):
    logits = model(batch[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  rows = [("frozen base", None, float(loss_fn(model.params, ids)), 0.0)]
  for name, cfg in [("LoRA r=8", mos_jax.MoSConfig.lora(8)),
                    ("MoS r=8, r_e=1, l=2", mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2)),
                    ("LoRA r=1", mos_jax.MoSConfig.lora(1))]:
    adapter = mos_jax.adapt(model.params, cfg)
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, min(10, args.steps - 1), args.steps))
    step = mos_jax.linen.make_train_step(loss_fn, optimizer)
    opt_state = optimizer.init(adapter)
    start = time.perf_counter()
    for i in range(args.steps):
      adapter, opt_state, loss = step(adapter, opt_state, model.params, ids, jax.random.key(i))
    rows.append((name, adapter, float(loss), time.perf_counter() - start))
  print(mos_jax.summary(rows[2][1]))
  print(f"\n{'run':<22} {'trainable':>10} {'final loss':>11} {'train s':>8}")
  for name, adapter, loss, seconds in rows:
    count = mos_jax.core.count_params(adapter) if adapter else 0
    print(f"{name:<22} {count:>10,} {loss:>11.4f} {seconds:>8.1f}")


if __name__ == "__main__":
  main()
