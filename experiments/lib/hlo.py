"""XLA's optimized HLO and a CPU profile, by kind of instruction: what bench_profile and bench_core read.

``instructions`` sorts every instruction of a compiled function's entry computation into a kind
(dense matmul, rank-r matmul, copy/transpose, elementwise/reduce, gather/scatter) with its bytes
(operands + result) and its source (JAX's ``op_name``: the function, named scope and primitive it
came from); ``profile`` times each instruction from one ``jax.profiler`` trace of several
variants run round-robin.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np

from experiments.lib.bench import Variant

KINDS = ("dense matmul", "rank-r matmul", "copy/transpose", "elementwise/reduce", "gather/scatter")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


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


def profile(variants: list[Variant], steps: int) -> list[dict[str, float]]:
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


def scope_share(v: Variant, scope: str, steps: int) -> dict[str, float]:
  """The time per step of ``v``'s instructions whose source lies in the named scope ``scope`` (forward and
  backward), from one profile of ``steps`` calls: ``{"ms", "step_ms", "share", "instructions"}``.

  Profiled time is the CPU runtime's per-instruction events summed (two threads may overlap, so
  ``step_ms`` is their sum too, not the wall time): the share is of the step's profiled work.
  """
  ms = profile([v], steps)[0]
  ins = instructions(v.compiled.as_text(), rank=-1)
  inside = [n for n, i in ins.items() if re.search(rf"(^|/|\(){re.escape(scope)}(/|\)|$)", i.source)]
  total = sum(ms.values())
  part = sum(ms.get(n, 0.0) for n in inside)
  return {"ms": part, "step_ms": total, "share": part / total if total else float("nan"), "instructions": len(inside)}
