"""Core cost benchmark: MoS train step versus LoRA at the same active rank.

On a small HF Flax Llama (GQA, all seven projections adapted) this measures,
in one process and with the variants interleaved round-robin:

  base fwd          jitted forward + next-token cross-entropy of the frozen base.
  base fwd+bwd      value_and_grad of that loss w.r.t. the token-embedding table
                    only: the full activation backward through every layer but
                    no weight gradients; the floor under any adapter step.
  LoRA step         make_train_step (adamw) with MoSConfig.lora(r).
  MoS step          make_train_step (adamw) with MoS at the same active rank r.
  factors step      adamw directly on the MoS step's (L, r, d) factors, no
                    assembly inside (profiling reference: a gather-free LoRA).
  assemble          jitted mos_jax.assemble(adapter) alone (forward).
  assemble fwd+bwd  jitted assemble plus its VJP (the scatter-add into pools).

Times exclude compilation and are medians over --repeats calls, each ended by
jax.block_until_ready. Memory per row is XLA's compiled memory analysis
(arguments + outputs - donated aliases + temporaries); on GPU the process
peak from memory_stats() is reported as well. Ratios are computed within the
run. Results go to experiments/results/bench_core.json (--out).

Two model sizes (--hidden): 256 (intermediate 688, 4 heads / 2 kv heads, batch 8 x 128, the
default) and 1024 (intermediate 2816, 16 heads / 8 kv heads, batch 4 x 128), both 8 layers, rank
8, float32. The 1024 run writes experiments/results/bench_core_h1024.json unless --out is given.

Run (each size takes a few minutes on 2 CPU cores):
  .venv/bin/python -m experiments.bench_core
  .venv/bin/python -m experiments.bench_core --hidden 1024
  .venv/bin/python -m experiments.bench_core --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments.lib import bench
from experiments.lib.bench import mib


@dataclasses.dataclass
class Sizes:
  hidden: int = 256
  intermediate: int = 688
  layers: int = 8
  heads: int = 4
  kv_heads: int = 2
  vocab: int = 1024
  batch: int = 8
  seq: int = 128
  rank: int = 8
  shards_per_vector: int = 2
  repeats: int = 20


QUICK = Sizes(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128,
              batch=2, seq=16, rank=4, repeats=3)

#: The model sizes of the README's tables, by hidden size (head dim 64 in both).
PRESETS = {256: Sizes(), 1024: Sizes(hidden=1024, intermediate=2816, heads=16, kv_heads=8, batch=4)}

#: The issue's targets on CPU: MoS step / frozen fwd+bwd, by hidden size; MoS / LoRA step; MoS / LoRA peak.
TARGET_OVER_FROZEN = {256: 1.25, 1024: 1.12}
TARGET_MOS_OVER_LORA = 1.02


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None, help="active rank r of LoRA and MoS (default 8)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers L (default 8)")
    p.add_argument("--hidden", type=int, default=256, choices=sorted(PRESETS),
                   help="model size preset by hidden size (default 256)")

  args = bench.bench_parser(__doc__, out_file="bench_core.json",
                            quick_help="tiny model, 3 repeats (smoke test)",
                            repeats_help="timed calls per variant (default 20)", extra=extra).parse_args()
  if args.hidden != 256 and args.out == bench.results_path("bench_core.json"):
    args.out = bench.results_path(f"bench_core_h{args.hidden}.json")
  return args


# ---------------------------------------------------------------- model, loss


def make_loss_fn(model) -> Callable[[Any, Any], jax.Array]:
  def loss_fn(params, batch):
    ids = batch["input_ids"]
    return bench.next_token_loss(model(ids, params=params, train=False).logits, ids)
  return loss_fn


def mos_config(s: Sizes) -> mos_jax.MoSConfig:
  r_e = max(1, s.rank // 8)
  return mos_jax.MoSConfig(rank=s.rank, equivalent_rank=r_e, private_rank=0,
                           shards_per_vector=s.shards_per_vector)


def check_fits(cfg: mos_jax.MoSConfig, layers: int) -> None:
  r, r_e, r_p, l = cfg.rank, cfg.equivalent_rank, cfg.private_rank, cfg.shards_per_vector
  if (r - r_p) * l > (r_e - r_p) * layers * l:
    raise SystemExit(f"MoS config does not fit: (r-r_p)*l = {(r - r_p) * l} > "
                     f"(r_e-r_p)*L*l = {(r_e - r_p) * layers * l}; raise --layers or lower --rank.")


# ------------------------------------------------------------------- variants


@dataclasses.dataclass
class CoreVariant(bench.Variant):
  """A variant with the number of parameters it trains (0 for the frozen base and assembly rows)."""

  trainable: int = 0


def base_variants(loss_fn, params, batch) -> list[CoreVariant]:
  fwd = bench.compile_variant("base fwd", "frozen base: forward + CE loss", jax.jit(loss_fn),
                                 (), (params, batch), cls=CoreVariant)

  def embed_loss(emb, params, batch):
    model = {**params["model"], "embed_tokens": {"embedding": emb}}
    return loss_fn({**params, "model": model}, batch)

  emb = params["model"]["embed_tokens"]["embedding"]
  bwd = bench.compile_variant("base fwd+bwd", "frozen base: value_and_grad w.r.t. embedding table only",
                                 jax.jit(jax.value_and_grad(embed_loss)), (), (emb, params, batch), cls=CoreVariant)
  return [fwd, bwd]


def step_variant(name, what, loss_fn, params, batch, config) -> tuple[CoreVariant, mos_jax.Adapter]:
  adapter = mos_jax.adapt(params, config)
  v = bench.train_step_variant(name, what, mos_jax.linen.adapted_loss(loss_fn), adapter, params, batch,
                                  cls=CoreVariant, trainable=mos_jax.core.count_params(adapter))
  return v, adapter


def factor_step_variant(loss_fn, params, batch, adapter) -> CoreVariant:
  """adamw on pre-assembled factors: the MoS step minus the gather/scatter."""
  factors = jax.jit(mos_jax.assemble)(adapter)

  def loss(factors, params, batch, rng):
    with mos_jax.linen.inject(adapter, factors=factors):
      return loss_fn(params, batch)

  return bench.train_step_variant("factors step", "adamw on MoS's (L,r,d) factors, no assembly", loss, factors,
                                     params, batch, cls=CoreVariant,
                                     trainable=mos_jax.core.count_params(factors))


def assembly_variants(adapter) -> list[CoreVariant]:
  fwd = jax.jit(mos_jax.assemble)
  cot = jax.tree_util.tree_map(jnp.ones_like, jax.eval_shape(mos_jax.assemble, adapter))

  def fwd_bwd(a, ct):
    out, vjp = jax.vjp(mos_jax.assemble, a)
    return out, vjp(ct)[0]

  return [bench.compile_variant("assemble", "MoS assemble(adapter) forward only", fwd, (), (adapter,),
                                   cls=CoreVariant),
          bench.compile_variant("assemble fwd+bwd", "assemble + VJP scatter-add into pools",
                                   jax.jit(fwd_bwd), (), (adapter, cot), cls=CoreVariant)]


# ------------------------------------------------------------ timing, memory


def device_peak() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def cost_of(v: CoreVariant) -> dict[str, float]:
  try:
    c = v.compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backend may not implement it
    return {}
  c = c[0] if isinstance(c, (list, tuple)) and c else c
  return {k: float(c[k]) for k in ("flops", "bytes accessed") if c and k in c}


def row(v: CoreVariant) -> dict[str, Any]:
  t = np.asarray(v.times)
  # Generated code size as well: this benchmark's rows (and its committed results) carry it.
  memory = bench.compiled_memory(v.compiled, extra_keys=("generated_code_size_in_bytes",))
  return {"name": v.name, "what": v.what, "median_ms": float(np.median(t) * 1e3),
          "min_ms": float(t.min() * 1e3), "p25_ms": float(np.percentile(t, 25) * 1e3),
          "p75_ms": float(np.percentile(t, 75) * 1e3), "repeats": len(t),
          "compile_s": v.compile_s, "trainable_params": v.trainable, "memory": memory, "cost": cost_of(v),
          "times_ms": [float(x * 1e3) for x in t]}


def paired(rows: dict[str, dict], num: str, den: str) -> float:
  """Median over rounds of the per-round ratio: robust to slow drifts in load."""
  return float(np.median(np.asarray(rows[num]["times_ms"]) / np.asarray(rows[den]["times_ms"])))


def ratios(rows: dict[str, dict]) -> dict[str, float]:
  ms = {k: r["median_ms"] for k, r in rows.items()}
  mem = {k: r["memory"].get("peak_estimate_bytes") for k, r in rows.items()}
  tmp = {k: r["memory"].get("temp_size_in_bytes") for k, r in rows.items()}
  out = {
      "mos_over_lora_step": ms["MoS step"] / ms["LoRA step"],
      "mos_over_lora_step_paired": paired(rows, "MoS step", "LoRA step"),
      "mos_over_lora_step_min": rows["MoS step"]["min_ms"] / rows["LoRA step"]["min_ms"],
      "lora_over_base_fwd": ms["LoRA step"] / ms["base fwd"],
      "mos_over_base_fwd": ms["MoS step"] / ms["base fwd"],
      "lora_over_base_fwd_bwd": ms["LoRA step"] / ms["base fwd+bwd"],
      "lora_over_base_fwd_bwd_paired": paired(rows, "LoRA step", "base fwd+bwd"),
      "mos_over_base_fwd_bwd": ms["MoS step"] / ms["base fwd+bwd"],
      "mos_over_base_fwd_bwd_paired": paired(rows, "MoS step", "base fwd+bwd"),
      "assemble_over_mos_step": ms["assemble"] / ms["MoS step"],
      "assemble_fwd_bwd_over_mos_step": ms["assemble fwd+bwd"] / ms["MoS step"],
      "mos_over_factors_step": ms["MoS step"] / ms["factors step"],
      "mos_over_factors_step_paired": paired(rows, "MoS step", "factors step"),
      "lora_over_factors_step": ms["LoRA step"] / ms["factors step"],
      "mos_over_lora_trainable": rows["MoS step"]["trainable_params"] / rows["LoRA step"]["trainable_params"],
  }
  if mem["MoS step"] and mem["LoRA step"]:
    out["mos_over_lora_peak_memory"] = mem["MoS step"] / mem["LoRA step"]
  if tmp["MoS step"] and tmp["LoRA step"]:
    out["mos_over_lora_temp_memory"] = tmp["MoS step"] / tmp["LoRA step"]
  return out


# --------------------------------------------------------------------- report


def gflop(cost: dict[str, float]) -> str:
  return f"{cost['flops'] / 1e9:.3f}" if "flops" in cost else "n/a"


def table(rows: dict[str, dict], ratio: dict[str, float]) -> str:
  head = (f"{'variant':<17} {'median ms':>10} {'p25':>9} {'p75':>9} {'compile s':>9} "
          f"{'trainable':>10} {'peak MiB':>9} {'temp MiB':>9} {'GFLOP':>8}")
  lines = [head, "-" * len(head)]
  for r in rows.values():
    m = r["memory"]
    lines.append(f"{r['name']:<17} {r['median_ms']:>10.3f} {r['p25_ms']:>9.3f} {r['p75_ms']:>9.3f} "
                 f"{r['compile_s']:>9.1f} {r['trainable_params']:>10,} "
                 f"{mib(m.get('peak_estimate_bytes')):>9} {mib(m.get('temp_size_in_bytes')):>9} "
                 f"{gflop(r['cost']):>8}")
  lines.append("")
  lines += [f"  {r['name']:<17} {r['what']}" for r in rows.values()]
  lines.append("")
  lines += [f"{k:<34} {v:.4f}" for k, v in ratio.items()]
  return "\n".join(lines)


def targets(hidden: int, ratio: dict[str, float]) -> dict[str, Any]:
  """The issue's targets for this size and whether this run met them (paired ratios, peak memory)."""
  want = {"mos_over_base_fwd_bwd_paired": TARGET_OVER_FROZEN.get(hidden),
          "mos_over_lora_step_paired": TARGET_MOS_OVER_LORA, "mos_over_lora_peak_memory": 1.0,
          "assemble_fwd_bwd_over_mos_step": 0.01}
  return {k: {"max": v, "value": ratio.get(k), "met": ratio.get(k) is not None and ratio[k] <= v}
          for k, v in want.items() if v is not None}


def main() -> None:
  args = parse_args()
  s = bench.sizes_from(args, PRESETS[args.hidden], QUICK, overrides=("repeats", "rank", "layers"))
  mcfg = mos_config(s)
  check_fits(mcfg, s.layers)
  print(f"sizes: {dataclasses.asdict(s)}")
  print(f"MoS: r={mcfg.rank} r_e={mcfg.equivalent_rank} r_p={mcfg.private_rank} "
        f"l={mcfg.shards_per_vector}; LoRA: r={s.rank}; env: {bench.environment()}", flush=True)

  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), make_loss_fn(model)
  variants = base_variants(loss_fn, params, batch)
  lora, _ = step_variant("LoRA step", f"make_train_step adamw, MoSConfig.lora({s.rank})",
                         loss_fn, params, batch, mos_jax.MoSConfig.lora(s.rank))
  mos, adapter = step_variant("MoS step", f"make_train_step adamw, MoS r={mcfg.rank} "
                              f"r_e={mcfg.equivalent_rank} l={mcfg.shards_per_vector} r_p=0",
                              loss_fn, params, batch, mcfg)
  variants += [lora, mos, factor_step_variant(loss_fn, params, batch, adapter),
               *assembly_variants(adapter)]
  print("compiled: " + ", ".join(f"{v.name} {v.compile_s:.1f}s" for v in variants), flush=True)

  bench.time_variants(variants, s.repeats)
  rows = {v.name: row(v) for v in variants}
  ratio = ratios(rows)
  print(table(rows, ratio))
  peak = device_peak()
  if peak is not None:
    print(f"device peak_bytes_in_use (whole process, all variants): {mib(peak):>8} MiB")

  result = {"sizes": dataclasses.asdict(s), "quick": args.quick,
            "mos_config": dataclasses.asdict(mcfg) | {"target_modules": list(mcfg.target_modules)},
            "lora_config": {"rank": s.rank, "equivalent_rank": s.rank, "private_rank": s.rank},
            "base_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
            "environment": bench.environment(), "device_peak_bytes_in_use": peak,
            "rows": rows, "ratios": ratio,
            "targets": targets(s.hidden, ratio)}
  for name, t in result["targets"].items():
    print(f"target {name} <= {t['max']}: {t['value']:.4f} {'met' if t['met'] else 'NOT met'}")
  bench.write_json(args.out, result)


if __name__ == "__main__":
  main()
