"""Multi-adapter serving benchmark: many MoS adapters in one batch versus one at a time.

On a small HF Flax Llama (GQA, all seven projections adapted) with a batch of
``--batch`` rows, where row ``b`` uses adapter ``b % K``:

  mixed           one jitted forward over the whole batch with
                  ``mos_jax.linen.inject_multi`` (stacked pools; the batch's
                  plan, ``mos_jax.core.plan_rows``, made on the host before the
                  timed loop as ``mos_jax.linen.serve`` makes it per batch).
  one at a time   for each adapter, a jitted forward over its rows only with
                  its factors assembled beforehand and injected as they are
                  (the best case for swapping adapters: no assembly in the
                  timed loop; each group's rows sliced on the device before it).
  base            the frozen model alone on the whole batch (the floor).

Throughput is tokens (rows x sequence length) per second, median over
``--repeats`` timed rounds after a warm-up (compilation excluded), each round
running the three variants in its own random order, every call ended by
``jax.block_until_ready``; the speedup (one at a time / mixed) is the median of
per-round ratios with its 95% bootstrap interval, also in process CPU time,
which drifts less than wall time on a shared machine. The NNX counterpart
(Tunix Gemma 3, 1 to 1,000 adapters, decoding steps) is
``experiments/bench_serving_nnx.py``. Memory per adapter compares the MoS pools
(+ int32 routing) with LoRA factors at the same active rank, in memory and as
files (native MoS safetensors vs the PEFT LoRA export of the same adapter).
Results go to experiments/results/bench_serving.json (``--out``).

Run (the default takes about two minutes on 2 CPU cores):
  .venv/bin/python -m experiments.bench_serving --threads 1
  .venv/bin/python -m experiments.bench_serving --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments.lib import bench
from experiments.lib.bench import tree_bytes
from mos_jax.core import plan_rows, stack_adapters
from mos_jax.linen import inject_multi


@dataclasses.dataclass
class Sizes:
  hidden: int = 256
  intermediate: int = 512
  layers: int = 4
  heads: int = 4
  kv_heads: int = 2
  vocab: int = 1024
  batch: int = 64
  seq: int = 32
  rank: int = 8
  equivalent_rank: int = 2
  shards_per_vector: int = 2
  adapters: tuple[int, ...] = (1, 8, 64)
  repeats: int = 9


QUICK = Sizes(hidden=64, intermediate=128, layers=2, vocab=128, batch=8, seq=8, rank=4, equivalent_rank=2,
              adapters=(1, 4, 8), repeats=2)


def parse_args() -> argparse.Namespace:
  return bench.bench_parser(__doc__, out_file="bench_serving.json",
                               quick_help="tiny model, 1/4/8 adapters, 2 repeats (smoke test)",
                               repeats_help="timed rounds per variant (default 9)").parse_args()


def build(s: Sizes) -> tuple[Any, Any, list[mos_jax.Adapter]]:
  """The model and ``max(s.adapters)`` adapters with distinct seeds and non-zero pools."""
  model = bench.build_llama(s)
  rng = np.random.default_rng(0)
  adapters = []
  for k in range(max(s.adapters)):
    adapter = mos_jax.adapt(model.params, mos_config(s, seed=k))
    # Trained-looking pools: B is zero at initialisation, which would make every adapter the base.
    pools = jax.tree_util.tree_map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32),
                                   adapter.pools)
    adapters.append(adapter.replace(pools=pools))
  return model, model.params, adapters


def mos_config(s: Sizes, *, seed: int) -> mos_jax.MoSConfig:
  return mos_jax.MoSConfig(rank=s.rank, equivalent_rank=s.equivalent_rank,
                           shards_per_vector=s.shards_per_vector, seed=seed)


#: The seed of the rounds' random orders.
ORDER_SEED = 0


def timed(variants: dict[str, Callable[[], Any]], repeats: int, seed: int) -> dict[str, list[bench.Timing]]:
  """Each variant's (wall, process CPU) seconds per round, every round in its own random order (``seed``).

  CPU time (all threads) is steadier than wall time on a machine shared with other jobs.
  """
  timings = bench.time_round_robin(list(variants.values()), repeats, shuffle=seed)
  return dict(zip(variants, timings))


def throughput(model: Any, params: Any, adapters: list[mos_jax.Adapter], s: Sizes) -> dict[str, Any]:
  input_ids = jnp.asarray(np.random.default_rng(1).integers(0, s.vocab, size=(s.batch, s.seq)), jnp.int32)
  tokens = s.batch * s.seq
  template = adapters[0]  # the groups and scale, shared by all adapters here

  @jax.jit
  def mixed(stack, ids, input_ids, params):
    with inject_multi(stack, ids), jax.numpy_rank_promotion("allow"):
      return model(input_ids, params=params).logits

  @jax.jit
  def one(factors, input_ids, params):
    with mos_jax.linen.inject(template, factors=factors), jax.numpy_rank_promotion("allow"):
      return model(input_ids, params=params).logits

  @jax.jit
  def base(input_ids, params):
    with jax.numpy_rank_promotion("allow"):
      return model(input_ids, params=params).logits

  factors = [jax.jit(mos_jax.assemble)(a) for a in adapters]
  rows, base_times = [], []
  for k in s.adapters:
    if s.batch % k:
      raise ValueError(f"batch {s.batch} must be a multiple of every adapter count, got {k}.")
    stack = stack_adapters(adapters[:k])
    ids = np.arange(s.batch, dtype=np.int32) % k
    plan = plan_rows(ids, k)  # checked and planned on the host once, as mos_jax.linen.serve does per batch
    # Each group's rows as a device array made here: no host-side indexing inside the timed loop.
    groups = [jnp.take(input_ids, jnp.asarray(np.flatnonzero(ids == j)), axis=0) for j in range(k)]
    t = timed({"mixed": lambda: mixed(stack, plan, input_ids, params),
               "one": lambda: [one(factors[j], g, params) for j, g in enumerate(groups)],
               "base": lambda: base(input_ids, params)}, s.repeats, ORDER_SEED + k)
    base_times += t["base"]
    mixed_t, one_t = bench.median_timing(t["mixed"]), bench.median_timing(t["one"])
    rows.append({"adapters": k, "rows_per_adapter": s.batch // k,
                 "mixed_tokens_per_s": tokens / mixed_t.wall_s, "one_at_a_time_tokens_per_s": tokens / one_t.wall_s,
                 "mixed_speedup": bench.paired_ratio([x.wall_s for x in t["one"]], [x.wall_s for x in t["mixed"]]),
                 "mixed_over_base": bench.paired_ratio([x.wall_s for x in t["mixed"]], [x.wall_s for x in t["base"]]),
                 "mixed_tokens_per_cpu_s": tokens / mixed_t.cpu_s,
                 "one_at_a_time_tokens_per_cpu_s": tokens / one_t.cpu_s,
                 "mixed_speedup_cpu": bench.paired_ratio([x.cpu_s for x in t["one"]], [x.cpu_s for x in t["mixed"]])})
  base_median = bench.median_timing(base_times)
  return {"rows": rows, "base_tokens_per_s": tokens / base_median.wall_s,
          "base_tokens_per_cpu_s": tokens / base_median.cpu_s}


def memory(adapter: mos_jax.Adapter, s: Sizes, stacked_adapters: int) -> dict[str, Any]:
  """Bytes per adapter, in memory and on disk, MoS versus LoRA at the same active rank."""
  groups = adapter.groups
  per_rank = sum(g.num_layers * (g.d_in + g.d_out) for g in groups) * 4  # float32 bytes per unit of rank
  pools = tree_bytes(adapter.pools)
  routing = sum(adapter.spec.index_a[g.name].nbytes + adapter.spec.index_b[g.name].nbytes for g in groups)
  with tempfile.TemporaryDirectory() as tmp:
    native = mos_jax.save_adapter(Path(tmp) / "adapter.safetensors", adapter).stat().st_size
    peft = (mos_jax.export_peft(Path(tmp) / "peft", adapter) / "adapter_model.safetensors").stat().st_size
  stack = stack_adapters([adapter] * stacked_adapters)
  stacked = tree_bytes(stack)
  return {"mos_pools_bytes": pools, "mos_routing_bytes": routing, "mos_total_bytes": pools + routing,
          "lora_same_rank_bytes": s.rank * per_rank, "lora_same_params_bytes": s.equivalent_rank * per_rank,
          "mos_file_bytes": native, "lora_peft_file_bytes": peft,
          "stacked_adapters": stacked_adapters, "stack_bytes": stacked,
          "lora_stack_bytes": stacked_adapters * s.rank * per_rank}


def table(result: dict[str, Any]) -> str:
  s, t, m = result["sizes"], result["throughput"], result["memory"]
  lines = [f"Llama hidden={s['hidden']} layers={s['layers']} vocab={s['vocab']}, batch {s['batch']} x seq {s['seq']}, "
           f"MoS r={s['rank']} r_e={s['equivalent_rank']} l={s['shards_per_vector']}, all 7 projections; "
           f"{result['device']}",
           "",
           f"{'adapters':>8} {'rows each':>9} {'mixed tok/s':>12} {'1-at-a-time tok/s':>18} {'speedup [95% CI]':>20} "
           f"{'speedup (CPU time)':>20}"]
  for r in t["rows"]:
    lines.append(f"{r['adapters']:>8} {r['rows_per_adapter']:>9} {r['mixed_tokens_per_s']:>12,.0f} "
                 f"{r['one_at_a_time_tokens_per_s']:>18,.0f} {bench.fmt_ratio(r['mixed_speedup'], 2):>20} "
                 f"{bench.fmt_ratio(r['mixed_speedup_cpu'], 2):>20}")
  lines += [f"{'base model, no adapter':>31} {t['base_tokens_per_s']:>12,.0f}", "",
            f"{'per adapter':<34} {'MoS':>10} {'LoRA r=' + str(s['rank']):>12}",
            f"{'in memory (pools + int32 routing)':<34} {m['mos_total_bytes']:>10,} {m['lora_same_rank_bytes']:>12,}",
            f"{'  of which routing':<34} {m['mos_routing_bytes']:>10,}",
            f"{'file (native MoS vs PEFT export)':<34} {m['mos_file_bytes']:>10,} {m['lora_peft_file_bytes']:>12,}",
            f"{str(m['stacked_adapters']) + ' adapters stacked':<34} {m['stack_bytes']:>10,} "
            f"{m['lora_stack_bytes']:>12,}",
            f"LoRA with MoS's parameter count (r={s['equivalent_rank']}): {m['lora_same_params_bytes']:,} bytes"]
  return "\n".join(lines)


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  s = bench.sizes_from(args, Sizes(), QUICK)
  model, params, adapters = build(s)
  result = {"sizes": dataclasses.asdict(s), "quick": args.quick,
            "mos_config": dataclasses.asdict(mos_config(s, seed=0)),
            "device": bench.device_summary(),
            "throughput": throughput(model, params, adapters, s),
            "memory": memory(adapters[0], s, stacked_adapters=max(s.adapters))}
  print(table(result))
  print()
  bench.write_json(args.out, result, run)


if __name__ == "__main__":
  main()
