"""How low the adapter's cost can go with separate XLA passes: the rank-r passes timed alone.

The library's term (``mos_jax.core.low_rank_term``) costs a train step six passes per adapted
projection beyond the frozen model's: ``h = x Aᵀ``, ``y + h Bᵀ`` (fused multiply-adds),
``dh = g B``, ``dA = dhᵀ x``, ``dBᵀ = hᵀ g`` and ``dx + dh A`` (fused). This times each pass
alone at every projection shape of bench_core's HF Flax Llama (``--hidden`` 256 or 1024, rank 8),
two ways: *hot*, one set of operands called again and again (in cache where it fits; the cost of
calling a trivial jitted function is measured in the same rounds and taken off), and *cold*, one
XLA program running the pass for every projection on operands of its own (read from memory, as a
step's backward reads activations saved long before). Each sum over the model's 56 projections is
set on top of the floor (the frozen fwd+bwd) timed in the same rounds, beside the library's MoS
step. ``(floor + hot passes) / floor`` is what the term costs as six separate passes, each at
its in-cache speed; ``cold`` is the same from memory. The library fuses ``h Bᵀ`` and ``dh A`` into
neighbouring operations and lands between the two; a cost below the hot sum needs the rank-r
work done inside the passes the base matmuls already make (docs/pallas.md).

Every round times the floor, the MoS step and every pass (each ``--calls`` times back to back,
per-call mean) in a random order; ratios are medians of per-round ratios with 95% bootstrap
intervals. Results go to experiments/results/bench_passes.json (--out) with the load average.

  .venv/bin/python -m experiments.bench_passes --threads 1                # hidden 256, ~1 minute
  .venv/bin/python -m experiments.bench_passes --hidden 1024 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments.lib import bench

#: The six passes the term adds per projection: ``(name, function, operand shapes from (t, d_in, d_out, r))``.
PASSES: tuple[tuple[str, Callable[..., jax.Array], Callable[..., list[tuple[int, ...]]]], ...] = (
    ("h = x Aᵀ", lambda x, a: x @ a.T, lambda t, i, o, r: [(t, i), (r, i)]),
    ("y + h Bᵀ (fused)", lambda y, h, b: y + sum(h[:, j:j + 1] * b[j] for j in range(h.shape[1])),
     lambda t, i, o, r: [(t, o), (t, r), (r, o)]),
    ("dh = g B", lambda g, b: g @ b, lambda t, i, o, r: [(t, o), (o, r)]),
    ("dA = dhᵀ x", lambda dh, x: jnp.einsum("tr,ti->ri", dh, x), lambda t, i, o, r: [(t, r), (t, i)]),
    ("dBᵀ = hᵀ g", lambda h, g: jnp.einsum("tr,to->ro", h, g), lambda t, i, o, r: [(t, r), (t, o)]),
    ("dx + dh A (fused)", lambda dx, dh, a: dx + sum(dh[:, j:j + 1] * a[j] for j in range(dh.shape[1])),
     lambda t, i, o, r: [(t, i), (t, r), (r, i)]),
)


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=256, choices=sorted(bench.CORE_PRESETS),
                   help="model size (default 256)")
    p.add_argument("--calls", type=int, default=None, help="calls of each pass per round (default 20)")

  return bench.bench_parser(__doc__, out_file="bench_passes.json", quick_help="tiny model",
                            repeats_help="rounds (default 12)", extra=extra).parse_args()


def projection_shapes(adapter: mos_jax.Adapter) -> collections.Counter:
  """``{(d_in, d_out): count}`` over the adapter's layers (``A`` is ``(r, d_in)``, ``B`` ``(d_out, r)``)."""
  return collections.Counter((a.shape[1], b.shape[0]) for a, b in mos_jax.core.layer_factors(adapter).values())


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  s = bench.CORE_QUICK if args.quick else bench.CORE_PRESETS[args.hidden]
  rounds, calls = args.repeats or (3 if args.quick else 12), args.calls or (2 if args.quick else 20)
  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench.llama_loss_fn(model)
  floor = bench.floor_variant(loss_fn, params, batch)
  adapter = mos_jax.adapt(params, bench.core_mos_config(s))
  step = bench.train_step_variant("MoS step", "mos_jax.linen.adapted_loss", mos_jax.linen.adapted_loss(loss_fn),
                                  adapter, params, batch)
  t = s.batch * s.seq
  shapes = projection_shapes(adapter)
  rng = np.random.default_rng(0)

  def operands(shape_fn, d_in, d_out):
    return [jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in shape_fn(t, d_in, d_out, s.rank)]

  # Hot: each pass at one shape, on one set of operands, `calls` times back to back (in cache), less
  # what a call of a trivial jitted function costs (Python's dispatch, XLA's launch). Cold: each pass
  # over all the model's projections in one XLA program, every projection with operands of its own
  # (read from memory, as a step's backward reads them).
  hot: list[tuple[str, tuple[int, int], Callable[[], Any]]] = []
  cold: list[tuple[str, Callable[[], Any]]] = []
  for name, fn, shape_fn in PASSES:
    for (d_in, d_out) in sorted(shapes):
      f, ops = jax.jit(fn), operands(shape_fn, d_in, d_out)

      def many(f=f, ops=ops):
        for _ in range(calls):
          out = f(*ops)
        return out

      hot.append((name, (d_in, d_out), many))
    sets = [operands(shape_fn, d_in, d_out) for (d_in, d_out), n in sorted(shapes.items()) for _ in range(n)]
    every = jax.jit(lambda sets, fn=fn: [fn(*ops) for ops in sets])
    cold.append((name, lambda every=every, sets=sets: every(sets)))
  tiny_f, tiny_x = jax.jit(lambda v: v + 1.0), jnp.zeros((8,), jnp.float32)

  def tiny():  # what one call costs beyond its work: Python's dispatch, XLA's launch
    for _ in range(calls):
      out = tiny_f(tiny_x)
    return out

  times = bench.time_round_robin([floor.call, step.call, tiny, *(j for _, _, j in hot), *(j for _, j in cold)],
                                 rounds, shuffle=0)
  wall = np.array([[x.wall_s for x in row] for row in times])  # (variants, rounds)
  floor_s, step_s, call_s = wall[0], wall[1], wall[2] / calls
  hot_s, cold_s = wall[3:3 + len(hot)] / calls - call_s, wall[3 + len(hot):]  # hot: the per-call cost taken off
  weights = np.array([shapes[shape] for _, shape, _ in hot])[:, None]
  hot_sum, cold_sum = (weights * hot_s).sum(axis=0), cold_s.sum(axis=0)  # per round, every pass summed
  by_pass = {name: {"hot_ms": 0.0, "cold_ms": 0.0} for name, _, _ in PASSES}
  for (name, shape, _), per_call in zip(hot, np.median(hot_s, axis=1)):
    by_pass[name]["hot_ms"] += shapes[shape] * float(per_call) * 1e3
  for (name, _), per_round in zip(cold, np.median(cold_s, axis=1)):
    by_pass[name]["cold_ms"] = float(per_round) * 1e3
  result = {
      "sizes": dataclasses.asdict(s), "rounds": rounds, "calls": calls, "environment": bench.environment(),
      "projections": {f"{i}x{o}": n for (i, o), n in sorted(shapes.items())},
      "floor_ms": float(np.median(floor_s) * 1e3), "step_ms": float(np.median(step_s) * 1e3),
      "per_call_us": float(np.median(call_s) * 1e6), "hot_passes_ms": float(np.median(hot_sum) * 1e3),
      "cold_passes_ms": float(np.median(cold_sum) * 1e3),
      "passes_by_kind": by_pass,
      "hot_passes_over_floor": bench.paired_ratio(floor_s + hot_sum, floor_s),
      "cold_passes_over_floor": bench.paired_ratio(floor_s + cold_sum, floor_s),
      "step_over_floor": bench.paired_ratio(step_s, floor_s),
  }
  print(f"hidden {s.hidden}, batch {s.batch} x {s.seq}, rank {s.rank}, {sum(shapes.values())} projections")
  print(f"  {'pass (ms per step)':<20} {'hot':>7} {'cold':>7}")
  for name, v in by_pass.items():
    print(f"  {name:<20} {v['hot_ms']:7.2f} {v['cold_ms']:7.2f}")
  print(f"  a call's own cost (taken off the hot times): {result['per_call_us']:.1f} us")
  print(f"  floor {result['floor_ms']:.1f} ms, MoS step {result['step_ms']:.1f} ms, passes hot "
        f"{result['hot_passes_ms']:.1f} / cold {result['cold_passes_ms']:.1f} ms")
  print(f"  (floor + passes) / floor: hot {bench.fmt_ratio(result['hot_passes_over_floor'])}, cold "
        f"{bench.fmt_ratio(result['cold_passes_over_floor'])}; MoS step / floor {bench.fmt_ratio(result['step_over_floor'])}")
  bench.write_json(args.out, result, run)


if __name__ == "__main__":
  main()
