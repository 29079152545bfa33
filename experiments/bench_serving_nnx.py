"""Multi-adapter serving on NNX: a Tunix Gemma 3 with 1 to 1,000 MoS adapters in one batch versus one at a time.

On a small random Tunix Gemma 3 (``Sizes``: 4 layers, the six projections MoS adapts, Gemma's
``kv_einsum`` split into k and v) with ``K`` adapters, a batch of ``max(--batch, K)`` rows where row
``b`` uses adapter ``b % K`` (interleaved, as requests arrive), for K in 1, 8, 64 and 1,000:

  mixed           ``mos_jax.nnx.adapt_multi(model, stack)`` with the batch's ids
                  (``set_adapter_ids``): one compiled call over the whole batch.
  one at a time   the rows grouped per adapter, each group run separately by the
                  single-adapter model (``mos_jax.nnx.adapt``, bound to that adapter's
                  pools: one compilation serves every adapter, the best case for
                  swapping); the groups' inputs are sliced before the timed loop.
  base            the model alone on the whole batch (the floor).

each in two jobs: a forward over ``--seq`` tokens per row (a prefill without cache), and one
KV-cache decoding step (one token per row, a cache of ``cache`` positions). All adapters share
one routing (config seed 0) and have their own random, non-zero pools (a single-adapter model
with another routing would recompile). Throughput is tokens per second (median over rounds); the
ratios are medians of per-round ratios with 95% bootstrap intervals; every round runs the six
calls in a random order (``bench.time_round_robin(shuffle=...)``), compilation excluded. Memory:
the bytes of the stacked adapters (pools, routing, scales) and XLA's compiled peak of the mixed
and base forwards at the largest K. Results: experiments/results/bench_serving_nnx.json (``--out``).

Targets (issue 23): mixed at least 0.9x one-at-a-time at 1 adapter and at least 1.2x at 64, read
on the interval (met: its low end is at or above the target; missed: its high end is below).

  .venv/bin/python -m experiments.bench_serving_nnx --threads 1
  .venv/bin/python -m experiments.bench_serving_nnx --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mos_jax
from experiments.lib import bench, lm_eval, serving
from experiments.lib.models import random_gemma3

#: Issue 23's targets for mixed / one-at-a-time throughput, by number of adapters.
TARGETS = {1: 0.9, 64: 1.2}
#: The seed of the rounds' random orders.
ORDER_SEED = 0


@dataclasses.dataclass
class Sizes:
  layers: int = 4
  embed: int = 256
  hidden: int = 512
  heads: int = 4
  head_dim: int = 64
  kv_heads: int = 1
  vocab: int = 2048
  batch: int = 64
  seq: int = 16
  cache: int = 64
  rank: int = 8
  equivalent_rank: int = 2
  shards_per_vector: int = 2
  adapters: tuple[int, ...] = (1, 8, 64, 1000)
  repeats: int = 9


QUICK = Sizes(layers=2, embed=32, hidden=48, heads=4, head_dim=8, kv_heads=2, vocab=64, batch=8, seq=4, cache=8,
              rank=2, equivalent_rank=1, adapters=(1, 4), repeats=2)


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", type=int, nargs="+", default=None,
                   help="adapter counts to measure (default 1 8 64 1000; --quick: 1 4)")

  return bench.bench_parser(__doc__, out_file="bench_serving_nnx.json",
                            quick_help="tiny model, 1 and 4 adapters, 2 rounds (smoke test)",
                            repeats_help="timed rounds (default 9)", extra=extra).parse_args()


def mos_config(s: Sizes) -> mos_jax.MoSConfig:
  return mos_jax.MoSConfig(rank=s.rank, equivalent_rank=s.equivalent_rank, shards_per_vector=s.shards_per_vector,
                           target_modules=mos_jax.nnx.GEMMA3_TARGETS, seed=0)


def build(s: Sizes) -> tuple[Any, list[mos_jax.Adapter]]:
  """The model and ``max(s.adapters)`` adapters of one routing with their own random, non-zero pools."""
  model = random_gemma3(vocab=s.vocab, embed=s.embed, hidden=s.hidden, layers=s.layers, heads=s.heads,
                        head_dim=s.head_dim, kv_heads=s.kv_heads, sliding_window=max(s.seq, s.cache))
  return model, serving.random_adapters(model, mos_config(s), max(s.adapters), scale=0.05)


# ------------------------------------------------------------------ inputs


def forward_inputs(tokens: jax.Array) -> tuple[jax.Array, ...]:
  """``(tokens, positions, None, mask)`` of a full causal forward over ``tokens``."""
  valid = jnp.ones(tokens.shape, bool)
  return tokens, lm_eval.positions_of(valid), None, lm_eval.causal_mask(valid)


def decode_inputs(model: Any, tokens: jax.Array, s: Sizes) -> tuple[Any, ...]:
  """``(last tokens, positions, cache, mask)`` of one decoding step at position ``cache // 2`` of a random cache."""
  rows, pos = tokens.shape[0], s.cache // 2
  rng = np.random.default_rng(2)
  cfg = model.config
  cache = {f"layer_{i}": {k: jnp.asarray(rng.standard_normal((rows, s.cache, cfg.num_kv_heads, cfg.head_dim)),
                                         jnp.float32) for k in ("k", "v")} | {"end_index": jnp.full((rows,), pos)}
           for i in range(cfg.num_layers)}
  mask = jnp.broadcast_to(jnp.arange(s.cache) <= pos, (rows, 1, s.cache))
  return tokens[:, :1], jnp.full((rows, 1), pos, jnp.int32), cache, mask


def take_rows(tree: Any, rows: np.ndarray) -> Any:
  """The rows ``rows`` of every array of ``tree`` (``None`` kept), as new device arrays."""
  idx = jnp.asarray(rows)
  return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), tree)


# ------------------------------------------------------------------ compiled calls


def compiled_model_call(model: nnx.Module, *inputs: Any) -> tuple[Callable[[], Any], Any]:
  """``(call, compiled)``: the model applied to ``inputs``, compiled once, its state bound."""
  graphdef, state = nnx.split(model)

  def run(state, *inputs):
    with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
      return nnx.merge(graphdef, state)(*inputs)

  compiled = jax.jit(run).lower(state, *inputs).compile()
  return (lambda: compiled(state, *inputs)), compiled


def one_adapter_calls(adapted: nnx.Module, adapters: list[mos_jax.Adapter], groups: list[tuple[Any, ...]]
                      ) -> Callable[[], Any]:
  """One call that runs ``groups[j]`` through the single-adapter model bound to ``adapters[j]``, for every j."""
  graphdef, _, state = mos_jax.nnx.unbind(adapted)

  def run(adapter, state, *inputs):
    with jax.numpy_rank_promotion("allow"):
      return mos_jax.nnx.bind(graphdef, adapter, state)(*inputs)

  fn = jax.jit(run)
  shapes: dict[Any, Any] = {}
  for adapter, inputs in zip(adapters, groups):  # one compilation per group shape, before any timing
    key = jax.tree_util.tree_structure(inputs), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(inputs))
    if key not in shapes:
      shapes[key] = fn.lower(adapter, state, *inputs).compile()
  calls = [(shapes[jax.tree_util.tree_structure(g), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(g))], a, g)
           for a, g in zip(adapters, groups)]
  return lambda: [c(a, state, *g) for c, a, g in calls]


# ------------------------------------------------------------------ the benchmark


def verdict(r: dict[str, Any], target: float) -> str:
  """``met`` when the interval's low end reaches ``target``, ``missed`` when its high end is below, else ``unclear``."""
  lo, hi = r["ci95"]
  return "met" if lo >= target else "missed" if hi < target else "unclear"


def measure(model: Any, adapters: list[mos_jax.Adapter], k: int, s: Sizes) -> dict[str, Any]:
  """The six variants (mixed / one at a time / base, forward and decode) for ``k`` adapters, timed in one set."""
  rows = max(s.batch, k)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, s.vocab, size=(rows, s.seq)), jnp.int32)
  ids = np.arange(rows, dtype=np.int32) % k
  served = mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters(adapters[:k]))
  plan = mos_jax.nnx.set_adapter_ids(served, ids)
  adapted = mos_jax.nnx.adapt(model, adapters[0])
  groups = [np.flatnonzero(ids == j) for j in range(k)]
  calls, compiled = {}, {}
  for job, inputs in (("forward", forward_inputs(tokens)), ("decode", decode_inputs(model, tokens, s))):
    calls[f"mixed {job}"], compiled[f"mixed {job}"] = compiled_model_call(served, *inputs)
    calls[f"one {job}"] = one_adapter_calls(adapted, adapters[:k], [take_rows(inputs, g) for g in groups])
    calls[f"base {job}"], compiled[f"base {job}"] = compiled_model_call(model, *inputs)
  timings = bench.time_round_robin(list(calls.values()), s.repeats, shuffle=ORDER_SEED + k)
  wall = {name: [t.wall_s for t in ts] for name, ts in zip(calls, timings)}
  out: dict[str, Any] = {"adapters": k, "rows": rows, "rows_per_adapter": rows // k,
                         "segmented": bool(plan.segmented),
                         "times_ms": {n: [1e3 * w for w in v] for n, v in wall.items()}}
  for job, tokens_per_call in (("forward", rows * s.seq), ("decode", rows)):
    job_out = {f"{v}_tokens_per_s": tokens_per_call / float(np.median(wall[f"{v} {job}"]))
               for v in ("mixed", "one", "base")}
    # one / mixed: above 1, mixing is faster.
    job_out["mixed_speedup"] = bench.paired_ratio(wall[f"one {job}"], wall[f"mixed {job}"])
    job_out["mixed_over_base"] = bench.paired_ratio(wall[f"mixed {job}"], wall[f"base {job}"])
    if k in TARGETS:
      job_out["target"] = {"min": TARGETS[k], "verdict": verdict(job_out["mixed_speedup"], TARGETS[k])}
    out[job] = job_out
  if k == max(s.adapters):
    out["memory"] = {n: bench.compiled_memory(c) for n, c in compiled.items()}
  return out


def stack_memory(adapters: list[mos_jax.Adapter]) -> dict[str, Any]:
  """Bytes of ``len(adapters)`` stacked adapters (pools, int32 routing, scales) and of as many same-rank LoRAs."""
  stack = mos_jax.core.stack_adapters(adapters)
  pools = bench.tree_bytes(stack.pools)
  routing = bench.tree_bytes((stack.index_a, stack.index_b))
  rank = adapters[0].config.rank
  lora = sum(g.num_layers * (g.d_in + g.d_out) for g in adapters[0].groups) * rank * 4  # float32 A and B per layer
  return {"adapters": len(adapters), "pools_bytes": pools, "routing_bytes": routing,
          "total_bytes": bench.tree_bytes(stack), "per_adapter_pools_bytes": pools // len(adapters),
          "lora_same_rank_bytes": len(adapters) * lora}


def table(result: dict[str, Any]) -> str:
  s = result["sizes"]
  lines = [f"Tunix Gemma 3 (random) layers={s['layers']} embed={s['embed']} mlp={s['hidden']} vocab={s['vocab']}, "
           f"forward {s['seq']} tokens/row, decode cache {s['cache']}; MoS r={s['rank']} r_e={s['equivalent_rank']} "
           f"l={s['shards_per_vector']}, six projections; {result['device']}", "",
           f"{'job':<8} {'adapters':>8} {'rows':>5} {'mixed tok/s':>12} {'1-at-a-time':>12} {'base tok/s':>11} "
           f"{'mixed / 1-at-a-time [95% CI]':>30} {'target':>12}"]
  for r in result["rows"]:
    for job in ("forward", "decode"):
      j = r[job]
      t = j.get("target")
      goal = f">= {t['min']}: {t['verdict']}" if t else ""
      lines.append(f"{job:<8} {r['adapters']:>8} {r['rows']:>5} {j['mixed_tokens_per_s']:>12,.0f} "
                   f"{j['one_tokens_per_s']:>12,.0f} {j['base_tokens_per_s']:>11,.0f} "
                   f"{bench.fmt_ratio(j['mixed_speedup'], 2):>30} "
                   f"{goal:>12}")
  m = result["stack_memory"]
  lines += ["", f"{m['adapters']} adapters stacked: pools {bench.mib(m['pools_bytes'])} MiB, routing "
            f"{bench.mib(m['routing_bytes'])} MiB ({m['per_adapter_pools_bytes']:,} pool bytes per adapter)"]
  return "\n".join(lines)


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  s = bench.sizes_from(args, Sizes(), QUICK)
  if args.adapters:
    s.adapters = tuple(args.adapters)
  if min(s.adapters) < 1:
    raise SystemExit(f"--adapters must all be at least 1, got {s.adapters}.")
  model, adapters = build(s)
  rows = []
  for k in s.adapters:
    rows.append(measure(model, adapters, k, s))
    print(f"{k} adapters done", flush=True)
  result = {"sizes": dataclasses.asdict(s), "quick": args.quick, "mos_config": dataclasses.asdict(mos_config(s)),
            "device": bench.device_summary(), "environment": bench.environment(), "targets": TARGETS, "rows": rows,
            "stack_memory": stack_memory(adapters[:max(s.adapters)])}
  print(table(result))
  print()
  bench.write_json(args.out, result, run)


if __name__ == "__main__":
  main()
