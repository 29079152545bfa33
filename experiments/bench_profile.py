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
Results go to experiments/results/bench_profile.json (--out).

  .venv/bin/python -m experiments.bench_profile              # ~2 minutes on 2 cores
  .venv/bin/python -m experiments.bench_profile --hidden 256
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Any

import jax
import numpy as np

import mos_jax
from experiments import bench_core, bench_levers
from experiments.lib import bench

KINDS = ("dense matmul", "rank-r matmul", "copy/transpose", "elementwise/reduce", "gather/scatter")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024, choices=sorted(bench_core.PRESETS),
                   help="model size (default 1024)")

  return bench.bench_parser(__doc__, out_file="bench_profile.json", quick_help="tiny model",
                            repeats_help="profiled steps per variant (default 5)", extra=extra).parse_args()


# ------------------------------------------------------------------------------------ HLO


@dataclasses.dataclass
class Instruction:
  name: str
  kind: str
  bytes: int
  shape: str
  source: str  # the jax op_name metadata (which module and primitive it came from)


def _dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape)]


def _size(shape: str) -> int:
  return sum(DTYPE_BYTES.get(dt, 4) * int(np.prod(d)) for dt, d in _dims(shape))


def _kind(name: str, op: str, body: str, shapes: list[str], rank: int) -> str:
  if op == "dot" or " dot(" in body:
    low_rank = any(len(d) == 2 and rank in d for s in shapes for _, d in _dims(s))
    return "rank-r matmul" if low_rank else "dense matmul"
  if "gather" in name or "scatter" in name or op in ("gather", "scatter"):
    return "gather/scatter"
  if "copy" in name or "transpose" in name or op in ("copy", "transpose"):
    return "copy/transpose"
  return "elementwise/reduce"


def instructions(hlo: str, rank: int) -> dict[str, Instruction]:
  """The entry computation's instructions (fusions, dots, copies), sorted into kinds."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S)}
  entry = hlo[hlo.index("\nENTRY"):]
  shapes: dict[str, str] = {}
  out = {}
  for line in entry.split("\n"):
    m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.+?) ([\w-]+)\((.*?)\)(.*)", line)
    if not m:
      continue
    name, shape, op, args, rest = m.groups()
    shape = re.sub(r"\{[^}]*\}", "", shape)
    shapes[name] = shape
    if op in ("parameter", "bitcast", "tuple", "get-tuple-element", "constant"):
      continue
    operands = [shapes.get(a.strip().lstrip("%"), "") for a in args.split(",")]
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    source = re.search(r'op_name="([^"]+)"', rest)
    out[name] = Instruction(name, _kind(name, op, bodies.get(calls.group(1), "") if calls else "", [shape, *operands],
                                        rank),
                            _size(shape) + sum(_size(s) for s in operands), shape,
                            source.group(1) if source else "")
  return out


# -------------------------------------------------------------------------------- profile


def profile(variants: list[bench.Variant], steps: int) -> list[dict[str, float]]:
  """Milliseconds per step of each HLO instruction of each variant, from one trace of ``steps`` rounds.

  The variants run round-robin inside one trace, so load on the machine hits them alike. Each
  call is one ``run_id`` in the trace; calls are sequential, so the k-th run in time is the k-th
  call made here.
  """
  for v in variants:
    jax.block_until_ready(v.call())
  order = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        for i, v in enumerate(variants):
          jax.block_until_ready(v.call())
          order.append(i)
    events = json.load(gzip.open(glob.glob(f"{d}/plugins/profile/*/perfetto_trace.json.gz")[0]))["traceEvents"]
  runs: dict[str, list[dict]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "run_id" in e.get("args", {}) and "hlo_op" in e["args"]:
      runs[e["args"]["run_id"]].append(e)
  timeline = sorted(runs.values(), key=lambda evs: min(e["ts"] for e in evs))
  if len(timeline) != len(order):
    raise RuntimeError(f"the trace has {len(timeline)} runs for {len(order)} calls")
  ms: list[collections.Counter] = [collections.Counter() for _ in variants]
  for i, evs in zip(order, timeline):
    for e in evs:
      ms[i][e["args"]["hlo_op"]] += e.get("dur", 0) / 1e3 / steps
  return ms


def breakdown(v: bench.Variant, ms: dict[str, float], rank: int) -> dict[str, Any]:
  ins = instructions(v.compiled.as_text(), rank)
  by_kind = {k: {"ms": 0.0, "mb": 0.0, "count": 0} for k in KINDS}
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
  s = bench_core.QUICK if args.quick else bench_core.PRESETS[args.hidden]
  steps = args.repeats or (2 if args.quick else 5)
  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench_core.make_loss_fn(model)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig.lora(s.rank))
  variants = [bench_core.base_variants(loss_fn, params, batch)[1],
              bench_levers.lever_variant("plain", loss_fn, params, batch, adapter),
              bench.train_step_variant("library", "mos_jax.linen.adapted_loss", mos_jax.linen.adapted_loss(loss_fn),
                                       adapter, params, batch)]
  result = {v.name: breakdown(v, ms, s.rank) for v, ms in zip(variants, profile(variants, steps))}
  names = list(result)
  head = f"{'kind (ms/step profiled | MB)':<30}" + "".join(f"{n:>26}" for n in names)
  lines = [f"hidden {s.hidden}, batch {s.batch} x {s.seq}, rank {s.rank}", head, "-" * len(head)]
  for k in (*KINDS, "total"):
    cells = [(r["by_kind"][k]["ms"], r["by_kind"][k]["mb"]) if k != "total" else (r["total_ms"], r["total_mb"])
             for r in result.values()]
    lines.append(f"{k:<30}" + "".join(f"{ms:>14.1f} | {mb:>8.0f}" for ms, mb in cells))
  for n in names[1:]:
    lines += ["", f"largest instructions of {n!r} other than dense matmuls (ms/step profiled):"]
    lines += [f"  {t['ms']:7.2f}  {t['kind']:<18} {t['shape']:<22} {t['source'][-80:]}"
              for t in [t for t in result[n]["top"] if t["kind"] != "dense matmul"][:12]]
  print("\n".join(lines))
  bench.write_json(args.out, {"sizes": dataclasses.asdict(s), "steps": steps, "environment": bench.environment(),
                              "variants": result})


if __name__ == "__main__":
  main()
