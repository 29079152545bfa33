"""Where a LoRA step's time goes on CPU: XLA's HLO and a profile, by kind of operation.

For bench_core's HF Flax Llama at one size (default hidden 1024), this compiles the frozen
model's forward+backward and the LoRA train step with the low-rank term computed two ways
(bench_levers' "plain" formula, the implementation before issue 14, and the library's
``mos_jax.linen.adapted_loss``), then:

  * sorts every instruction of each optimized HLO module into a kind: dense matmuls, rank-r
    matmuls (a 2-D operand or result with an axis of size r), copies/transposes, elementwise
    and reductions, gathers/scatters;
  * sums XLA's bytes (operands + result) per kind from the HLO text, and the time per kind from
    one ``jax.profiler`` trace of a few rounds of the three steps, round-robin (the CPU runtime's
    per-instruction events; two threads may overlap, so a sum can exceed the wall time);
  * lists the largest instructions the adapter adds (by time), with their source op.

All three run in one trace, so the variants' times are comparable even on a loaded machine.
The frozen fwd+bwd is bench_core's floor (gradient w.r.t. scalars added to layer 0's q/k/v
outputs). The HLO and profile machinery lives in experiments/lib/hlo.py, the levers in
experiments/lib/levers.py. Results go to experiments/results/bench_profile.json (--out), with the
load average before and after.

  .venv/bin/python -m experiments.bench_profile --threads 1  # ~3 minutes on one core
  .venv/bin/python -m experiments.bench_profile --hidden 256
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import mos_jax
from experiments.lib import bench, hlo, levers


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024, choices=sorted(bench.CORE_PRESETS),
                   help="model size (default 1024)")

  return bench.bench_parser(__doc__, out_file="bench_profile.json", quick_help="tiny model",
                            repeats_help="profiled steps per variant (default 5)", extra=extra).parse_args()


def breakdown(v: bench.Variant, ms: dict[str, float], rank: int) -> dict[str, Any]:
  ins = hlo.instructions(v.compiled.as_text(), rank)
  by_kind = {k: {"ms": 0.0, "mb": 0.0, "count": 0} for k in hlo.KINDS}
  for name, i in ins.items():
    by_kind[i.kind]["ms"] += ms.get(name, 0.0)
    by_kind[i.kind]["mb"] += i.bytes / 1e6
    by_kind[i.kind]["count"] += 1
  top = sorted(((ms.get(n, 0.0), i) for n, i in ins.items()), key=lambda t: -t[0])[:40]
  return {"by_kind": by_kind, "total_ms": sum(k["ms"] for k in by_kind.values()),
          "total_mb": sum(k["mb"] for k in by_kind.values()),
          "top": [{"ms": t, "name": i.name, "kind": i.kind, "shape": i.shape, "mb": i.bytes / 1e6,
                   "source": re.sub(r"^.*?/(transpose\(jvp|jvp)", r"\1", i.source)} for t, i in top]}


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  s = bench.CORE_QUICK if args.quick else bench.CORE_PRESETS[args.hidden]
  steps = args.repeats or (2 if args.quick else 5)
  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench.llama_loss_fn(model)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig.lora(s.rank))
  variants = [bench.floor_variant(loss_fn, params, batch),
              levers.step_variant("plain", loss_fn, params, batch, adapter),
              bench.train_step_variant("library", "mos_jax.linen.adapted_loss", mos_jax.linen.adapted_loss(loss_fn),
                                       adapter, params, batch)]
  result = {v.name: breakdown(v, ms, s.rank) for v, ms in zip(variants, hlo.profile(variants, steps))}
  names = list(result)
  head = f"{'kind (ms/step profiled | MB)':<30}" + "".join(f"{n:>26}" for n in names)
  lines = [f"hidden {s.hidden}, batch {s.batch} x {s.seq}, rank {s.rank}", head, "-" * len(head)]
  for k in (*hlo.KINDS, "total"):
    cells = [(r["by_kind"][k]["ms"], r["by_kind"][k]["mb"]) if k != "total" else (r["total_ms"], r["total_mb"])
             for r in result.values()]
    lines.append(f"{k:<30}" + "".join(f"{ms:>14.1f} | {mb:>8.0f}" for ms, mb in cells))
  for n in names[1:]:
    lines += ["", f"largest instructions of {n!r} other than dense matmuls (ms/step profiled):"]
    lines += [f"  {t['ms']:7.2f}  {t['kind']:<18} {t['shape']:<22} {t['source'][-80:]}"
              for t in [t for t in result[n]["top"] if t["kind"] != "dense matmul"][:12]]
  print("\n".join(lines))
  bench.write_json(args.out, {"sizes": dataclasses.asdict(s), "steps": steps, "environment": bench.environment(),
                              "variants": result}, run)


if __name__ == "__main__":
  main()
