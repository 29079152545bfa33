"""Where the adapter's overhead goes: each way of computing the low-rank term, in one LoRA train step.

On bench_core's HF Flax Llama (all seven projections, rank 8, AdamW, float32) this times, in one
process and round-robin, the frozen model's forward+backward (the floor, as in bench_core) and
one LoRA train step per lever, each lever being a way to add ``(α/r)·(x Aᵀ) Bᵀ`` to every
projection:

  plain               scale · (x Aᵀ) Bᵀ, differentiated by JAX: the implementation before issue 14.
  scale on r          (scale · x Aᵀ) Bᵀ: the scale on the (tokens, r) intermediate, autodiff.
  custom VJP          a hand-written backward (saves x and h = x Aᵀ; four rank-r products), but dB
                      left as gᵀh, which XLA emits with d_out as the major axis of a (d_out, r) dot.
  custom VJP, fast dB dBᵀ = hᵀ g as an (r, d_out) product, the orientation the CPU kernels run
                      ~5x faster (a barrier keeps XLA from folding the transpose back).
  + fused h·Bᵀ        and the forward's h Bᵀ as r broadcast multiply-adds, which XLA fuses into
                      the layer's add and its consumers: the library (mos_jax.core.low_rank_term)
                      up to rank 8; forced here at any rank.
  + fused h·Bᵀ, dh·A  the backward's dh A fused the same way too.
  shared A            "custom VJP, fast dB" with one x·[A_q; A_k; A_v]ᵀ (and [A_gate; A_up]) for
                      the projections that share an input, instead of three (two).
  shared A, fused h·Bᵀ  the same with h·Bᵀ as fused multiply-adds (as the library up to rank 8): one
                      x·A_catᵀ, one dA_cat = dh_catᵀ x and one dx = dh_cat A_cat per shared input.
  fold into W         y = x (W + scale·Aᵀ Bᵀ), custom VJP: no full-width term, but ΔW formed per
                      step (and kept for the backward).
  own matmul          the layer's x W and the term in one custom VJP (as "+ fused h·Bᵀ"): the
                      reference for the three below, which fuse the term into the base's passes.
  x·[W | Aᵀ] (fwd)    one matmul of x with the kernel and Aᵀ concatenated: x W and h = x Aᵀ in
                      one pass over x (the kernel is copied with Aᵀ beside it every step).
  g·[W; Bᵀ]ᵀ (bwd)    one matmul of the output cotangent g with [W; Bᵀ]: the base's g Wᵀ and
                      dh = g B in one pass over g; dh A added as fused multiply-adds.
  both concatenated   both of the above.
  library inject      mos_jax.linen.adapted_loss, the real code path (equals "+ fused h·Bᵀ" up to
                      rank 8, "custom VJP, fast dB" above).

The levers live in experiments/lib/levers.py. XLA flags are levers too: run the script under
them (e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT, which lets
XNNPACK's successor fuse elementwise consumers into the matmuls) with another --out; the flags are
recorded in the JSON, and the floor runs under them too.

Each lever runs through a small interceptor written with public names only, so the levers differ
in the term alone. Reported per lever: median ms, the median per-round ratio over the frozen
fwd+bwd (bench_core's floor) and over "plain" with 95% bootstrap intervals, XLA's compiled peak
memory and bytes accessed; the load average before and after. Results go to
experiments/results/bench_levers.json (--out).

  .venv/bin/python -m experiments.bench_levers --threads 1   # both sizes, ~10 minutes on one core
  .venv/bin/python -m experiments.bench_levers --hidden 1024 --rank 16 --out /tmp/levers_r16.json
  .venv/bin/python -m experiments.bench_levers --quick       # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

import mos_jax
from experiments.lib import bench, levers
from experiments.lib.bench import mib


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, nargs="+", default=sorted(bench.CORE_PRESETS),
                   choices=sorted(bench.CORE_PRESETS), help="model sizes (default: 256 1024)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 8)")
    p.add_argument("--levers", nargs="+", default=None, choices=levers.LEVERS,
                   help="time only these levers (default: all)")

  return bench.bench_parser(__doc__, out_file="bench_levers.json", quick_help="tiny model, 2 repeats (smoke test)",
                            repeats_help="timed calls per variant (default 20 at hidden 256, 10 at 1024)",
                            extra=extra).parse_args()


# ---------------------------------------------------------------------------------- report


def row(v: bench.Variant, frozen: bench.Variant, before: bench.Variant | None) -> dict[str, Any]:
  t = np.asarray(v.times)
  cost = bench.cost_of(v.compiled)
  out = {"name": v.name, "what": v.what, "median_ms": float(np.median(t) * 1e3), "compile_s": v.compile_s,
         "over_frozen": bench.paired_ratio(t, frozen.times),
         "memory": bench.compiled_memory(v.compiled), "gflop": cost.get("flops", 0) / 1e9,
         "gb_accessed": cost.get("bytes accessed", 0) / 1e9, "times_ms": [float(x * 1e3) for x in t]}
  if before is not None:
    out["over_plain"] = bench.paired_ratio(t, before.times)
  return out


def run_size(s: bench.CoreSizes, names: tuple[str, ...]) -> dict[str, Any]:
  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench.llama_loss_fn(model)
  frozen = bench.floor_variant(loss_fn, params, batch)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig.lora(s.rank))
  variants = [frozen] + [levers.step_variant(lv, loss_fn, params, batch, adapter) for lv in names]
  library = bench.train_step_variant("library inject", "mos_jax.linen.adapted_loss (make_train_step's loss)",
                                     mos_jax.linen.adapted_loss(loss_fn), adapter, params, batch)
  variants.append(library)
  print(f"hidden {s.hidden}: compiled " + ", ".join(f"{v.name} {v.compile_s:.1f}s" for v in variants), flush=True)
  bench.time_variants(variants, s.repeats)
  before = next((v for v in variants if v.name == "plain"), None)
  rows = [row(v, frozen, before) for v in variants]
  head = f"{'lever':<22} {'median ms':>10} {'/ frozen [95% CI]':>24} {'/ plain':>8} {'peak MiB':>9} {'GB accessed':>12}"
  print("\n".join([f"hidden {s.hidden}, batch {s.batch} x {s.seq}", head, "-" * len(head)] + [
      f"{r['name']:<22} {r['median_ms']:>10.1f} {bench.fmt_ratio(r['over_frozen']):>24} "
      f"{r['over_plain']['median'] if 'over_plain' in r else float('nan'):>8.3f} "
      f"{mib(r['memory'].get('peak_estimate_bytes')):>9} {r['gb_accessed']:>12.2f}" for r in rows]), flush=True)
  return {"sizes": dataclasses.asdict(s), "rows": rows}


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  names = tuple(args.levers or levers.LEVERS)
  sizes = [bench.CORE_QUICK] if args.quick else [bench.CORE_PRESETS[h] for h in args.hidden]
  runs = {}
  for s in sizes:
    s = dataclasses.replace(s, repeats=args.repeats or (2 if args.quick else 20 if s.hidden <= 256 else 10),
                            rank=args.rank or s.rank)
    runs[str(s.hidden)] = run_size(s, names)
  bench.write_json(args.out, {"quick": args.quick, "environment": bench.environment(), "runs": runs,
                              "levers": list(names)}, run)


if __name__ == "__main__":
  main()
