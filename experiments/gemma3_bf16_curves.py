"""Does MoS train Gemma 3 270M in bfloat16 along the float32 loss curve? A few seeds, both dtypes.

The bfloat16 path of ``mos_jax`` computes the low-rank term in the model's dtype (the factors cast
down, float32 accumulation, float32 pools and gradients). This script checks that it trains like
the float32 model: the pretrained Gemma 3 270M (``experiments.lib.gemma3_weights``) loaded once per dtype,
MoS (r = 8, r_e = 1, l = 2, the six projections of ``mos_jax.nnx.GEMMA3_TARGETS``) trained for
``--steps`` AdamW steps on GSM8K question/answer pairs (the loss is the answer tokens'
cross-entropy, ``experiments.lib.instruct``), for each seed in ``--seeds``. A seed fixes the
adapter's initialisation and routing and the order of the batches, the same in both dtypes, so the
difference between the two curves of a seed is the dtype's effect alone; the spread between seeds
of one dtype is the noise it is compared with. After training, each run's loss on a fixed set of
held-out test pairs.

Reported (experiments/results/gemma3_bf16_curves.json, --out): every curve, and per step the mean
and standard deviation over seeds of each dtype and of the paired difference bf16 - f32; the
summary compares the mean paired difference over the last quarter of the steps (and of the eval
losses) with the seed-to-seed standard deviation. Not timed (step times are recorded, on a shared
machine); GSM8K from ``--data-dir`` (default ../shared/data/gsm8k), generated problems otherwise.

  .venv/bin/python -m experiments.gemma3_bf16_curves                  # 3 seeds x 2 dtypes x 25 steps
  .venv/bin/python -m experiments.gemma3_bf16_curves --quick          # 2 steps, 1 seed: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib import bench, gemma3_weights, gsm8k_data, instruct
from experiments.lib.paths import default_data_dir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class CurveConfig:
  seeds: tuple[int, ...] = (0, 1, 2)
  steps: int = 25
  batch: int = 4
  lr: float = 1e-3
  seq_len: int = 128
  response_len: int = 64
  eval_pairs: int = 16
  rank: int = 8


QUICK = CurveConfig(seeds=(0,), steps=2, eval_pairs=4)


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="1 seed, 2 steps, 4 eval pairs (smoke test)")
  p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
  p.add_argument("--steps", type=int, default=None, help="training steps per run (default 25)")
  p.add_argument("--data-dir", default=default_data_dir("gsm8k"), help="GSM8K train/test.jsonl folder")
  p.add_argument("--cache-dir", default=None, help="where the converted Gemma 3 weights are cached")
  bench.add_threads_flag(p)
  p.add_argument("--out", default=bench.results_path("gemma3_bf16_curves.json"), help="JSON output path")
  return p.parse_args()


def encoded(tokenizer: Any, pairs: list[tuple[str, str]], cfg: CurveConfig) -> instruct.Batch:
  batch, _ = instruct.encode_pairs(tokenizer, [q for q, _ in pairs], [a for _, a in pairs], [0] * len(pairs),
                                   seq_len=cfg.seq_len, response_len=cfg.response_len)
  return batch


def train_curve(model: Any, data: instruct.Batch, held_out: instruct.Batch, cfg: CurveConfig,
                seed: int) -> dict[str, Any]:
  """Trains a fresh adapter (seeded by ``seed``) for ``cfg.steps`` steps; the losses and the held-out loss."""
  config = mos_jax.MoSConfig(rank=cfg.rank, equivalent_rank=max(1, cfg.rank // 8), shards_per_vector=2,
                             target_modules=mos_jax.nnx.GEMMA3_TARGETS, seed=seed)
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, config))

  def loss_fn(adapter, state, batch, rng):
    return instruct.response_loss(mos_jax.nnx.bind(graphdef, adapter, state), batch)

  opt = optax.adamw(cfg.lr)
  step = mos_jax.train.make_step(loss_fn, opt)
  opt_state = opt.init(adapter)
  n = instruct.size(data)
  losses, seconds = [], []
  for i in range(cfg.steps):
    batch = instruct.take(data, np.random.default_rng([seed, i]).choice(n, cfg.batch, replace=False))
    t0 = time.perf_counter()
    adapter, opt_state, loss = step(adapter, opt_state, state, batch, jax.random.key(seed))
    losses.append(float(loss))
    seconds.append(time.perf_counter() - t0)
  dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(adapter.pools)}
  if dtypes != {"float32"}:
    raise RuntimeError(f"the pools trained in {dtypes}, not float32: the bfloat16 path must keep them float32.")
  evaluate = jax.jit(lambda adapter, state, batch: loss_fn(adapter, state, batch, None))
  chunks = [instruct.take(held_out, np.arange(i, min(i + cfg.batch, instruct.size(held_out))))
            for i in range(0, instruct.size(held_out), cfg.batch)]
  held = float(np.mean([float(evaluate(adapter, state, c)) for c in chunks]))
  return {"seed": seed, "losses": losses, "held_out_loss": held, "step_seconds": float(np.median(seconds[1:] or seconds)),
          "compile_and_first_step_s": seconds[0]}


def summarize(runs: dict[str, list[dict[str, Any]]], steps: int) -> dict[str, Any]:
  """Per step: mean and sd over seeds of each dtype and of the paired difference; the end-of-run comparison."""
  f32 = np.asarray([r["losses"] for r in runs["float32"]])
  bf16 = np.asarray([r["losses"] for r in runs["bfloat16"]])
  diff = bf16 - f32
  tail = slice(steps - max(1, steps // 4), steps)
  end = {d: np.asarray([np.mean(r["losses"][tail]) for r in runs[d]]) for d in DTYPES}
  held = {d: np.asarray([r["held_out_loss"] for r in runs[d]]) for d in DTYPES}
  sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
  out = {"per_step": {"float32_mean": f32.mean(0).tolist(), "float32_sd": [sd(c) for c in f32.T],
                      "bfloat16_mean": bf16.mean(0).tolist(), "bfloat16_sd": [sd(c) for c in bf16.T],
                      "diff_mean": diff.mean(0).tolist(), "diff_sd": [sd(c) for c in diff.T]},
         "mean_abs_step_diff": float(np.abs(diff).mean()),
         "mean_step_seed_sd": float(np.nanmean([sd(c) for c in f32.T])) if len(f32) > 1 else float("nan")}
  for name, values in (("last_quarter_train_loss", end), ("held_out_loss", held)):
    gap = values["bfloat16"] - values["float32"]
    out[name] = {"float32": values["float32"].tolist(), "bfloat16": values["bfloat16"].tolist(),
                 "paired_diff_mean": float(gap.mean()), "paired_diff_sd": sd(gap),
                 "seed_sd_float32": sd(values["float32"]), "seed_sd_bfloat16": sd(values["bfloat16"])}
  return out


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  cfg = dataclasses.replace(QUICK if args.quick else CurveConfig(),
                            **({"seeds": tuple(args.seeds)} if args.seeds else {}),
                            **({"steps": args.steps} if args.steps else {}))
  tokenizer = gemma3_weights.load_tokenizer(args.cache_dir)
  train, test, source = gsm8k_data.get_data(args.data_dir, allow_network=False, seed=0)
  data = encoded(tokenizer, train[:4000], cfg)
  held_out = instruct.take(encoded(tokenizer, test[:400], cfg), np.arange(cfg.eval_pairs))
  print(f"data: {source}; {instruct.size(data)} training pairs fit seq_len {cfg.seq_len} / response_len "
        f"{cfg.response_len}; {cfg.eval_pairs} held-out pairs; {cfg}", flush=True)
  runs: dict[str, list[dict[str, Any]]] = {}
  for name, dtype in DTYPES.items():
    model, _ = gemma3_weights.load_gemma3_270m(args.cache_dir, dtype=dtype)
    runs[name] = []
    for seed in cfg.seeds:
      r = train_curve(model, data, held_out, cfg, seed)
      runs[name].append(r)
      print(f"{name} seed {seed}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, held-out {r['held_out_loss']:.4f}, "
            f"{r['step_seconds']:.2f} s/step", flush=True)
    del model
  summary = summarize(runs, cfg.steps)
  for name in ("last_quarter_train_loss", "held_out_loss"):
    s = summary[name]
    print(f"{name}: bf16 - f32 paired {s['paired_diff_mean']:+.4f} (sd {s['paired_diff_sd']:.4f}); seed-to-seed sd "
          f"f32 {s['seed_sd_float32']:.4f}, bf16 {s['seed_sd_bfloat16']:.4f}")
  bench.write_json(args.out, {"config": dataclasses.asdict(cfg), "data": source, "quick": args.quick,
                              "environment": bench.environment(), "runs": runs, "summary": summary}, run)


if __name__ == "__main__":
  main()
