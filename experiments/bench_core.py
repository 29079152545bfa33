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
  assemble          jitted mos_jax.assemble(pools, routing) alone (forward).
  assemble fwd+bwd  jitted assemble plus its VJP (the scatter-add into pools).

Times exclude compilation and are medians over --repeats calls, each ended by
jax.block_until_ready. Memory per row is XLA's compiled memory analysis
(arguments + outputs - donated aliases + temporaries); on GPU the process
peak from memory_stats() is reported as well. Ratios are computed within the
run. Results go to experiments/results/bench_core.json (--out).

Run (defaults take a few minutes on 2 CPU cores):
  .venv/bin/python experiments/bench_core.py
  .venv/bin/python experiments/bench_core.py --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_core.json")


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


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model, 3 repeats (smoke test)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 20)")
  p.add_argument("--rank", type=int, default=None, help="active rank r of LoRA and MoS (default 8)")
  p.add_argument("--layers", type=int, default=None, help="decoder layers L (default 8)")
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  return p.parse_args()


def sizes_from(args: argparse.Namespace) -> Sizes:
  s = dataclasses.replace(QUICK) if args.quick else Sizes()
  for name in ("repeats", "rank", "layers"):
    if getattr(args, name) is not None:
      setattr(s, name, getattr(args, name))
  return s


# ---------------------------------------------------------------- model, loss


def build_model(s: Sizes):
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                    num_hidden_layers=s.layers, num_attention_heads=s.heads,
                    num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                    max_position_embeddings=max(s.seq, 128), tie_word_embeddings=False)
  return FlaxLlamaForCausalLM(cfg, seed=0)


def make_loss_fn(model) -> Callable[[Any, Any], jax.Array]:
  def loss_fn(params, batch):
    ids = batch["input_ids"]
    logits = model(ids, params=params, train=False).logits[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), ids[:, 1:]).mean()
  return loss_fn


def make_batch(s: Sizes) -> dict[str, jax.Array]:
  ids = jax.random.randint(jax.random.key(1), (s.batch, s.seq), 0, s.vocab, dtype=jnp.int32)
  return {"input_ids": ids}


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
class Variant:
  """A compiled function plus the state it threads through repeated calls."""

  name: str
  what: str
  compiled: Any
  state: tuple
  const: tuple
  carry: int  # leading outputs fed back as the next call's leading state
  compile_s: float
  trainable: int = 0
  times: list = dataclasses.field(default_factory=list)

  def call(self):
    out = self.compiled(*self.state, *self.const)
    if self.carry:
      self.state = tuple(out[:self.carry])
    return out


def compile_variant(name, what, fn, state, const, carry, trainable=0) -> Variant:
  t0 = time.perf_counter()
  compiled = fn.lower(*state, *const).compile()
  return Variant(name, what, compiled, tuple(state), tuple(const), carry,
                 time.perf_counter() - t0, trainable)


def base_variants(loss_fn, params, batch) -> list[Variant]:
  fwd = compile_variant("base fwd", "frozen base: forward + CE loss", jax.jit(loss_fn),
                        (), (params, batch), 0)

  def embed_loss(emb, params, batch):
    model = {**params["model"], "embed_tokens": {"embedding": emb}}
    return loss_fn({**params, "model": model}, batch)

  emb = params["model"]["embed_tokens"]["embedding"]
  bwd = compile_variant("base fwd+bwd", "frozen base: value_and_grad w.r.t. embedding table only",
                        jax.jit(jax.value_and_grad(embed_loss)), (), (emb, params, batch), 0)
  return [fwd, bwd]


def step_variant(name, what, loss_fn, params, batch, config) -> tuple[Variant, mos_jax.Adapter]:
  adapter = mos_jax.adapt(params, config)
  opt = optax.adamw(1e-3)
  step = mos_jax.make_train_step(loss_fn, adapter.routing, opt)
  pools = jax.tree_util.tree_map(jnp.copy, adapter.pools)  # the step donates its copy
  state = (pools, opt.init(pools))
  v = compile_variant(name, what, step, state, (params, batch, jax.random.key(2)), 2,
                      mos_jax.trainable_count(adapter.routing))
  return v, adapter


def factor_step_variant(loss_fn, params, batch, adapter) -> Variant:
  """adamw on pre-assembled factors: the MoS step minus the gather/scatter."""
  routing, opt = adapter.routing, optax.adamw(1e-3)
  factors = jax.jit(mos_jax.assemble, static_argnums=1)(adapter.pools, routing)

  def loss(factors, params, batch):
    with mos_jax.inject(factors, routing):
      return loss_fn(params, batch)

  def step(factors, opt_state, params, batch):
    value, grads = jax.value_and_grad(loss)(factors, params, batch)
    updates, opt_state = opt.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, value

  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(factors))
  return compile_variant("factors step", "adamw on MoS's (L,r,d) factors, no assembly",
                         jax.jit(step, donate_argnums=(0, 1)),
                         (factors, opt.init(factors)), (params, batch), 2, n)


def assembly_variants(adapter) -> list[Variant]:
  routing, pools = adapter.routing, adapter.pools
  fwd = jax.jit(lambda p: mos_jax.assemble(p, routing))
  cot = jax.tree_util.tree_map(jnp.ones_like, jax.eval_shape(lambda p: mos_jax.assemble(p, routing), pools))

  def fwd_bwd(p, ct):
    out, vjp = jax.vjp(lambda q: mos_jax.assemble(q, routing), p)
    return out, vjp(ct)[0]

  return [compile_variant("assemble", "MoS assemble(pools, routing) forward only", fwd, (), (pools,), 0),
          compile_variant("assemble fwd+bwd", "assemble + VJP scatter-add into pools",
                          jax.jit(fwd_bwd), (), (pools, cot), 0)]


# ------------------------------------------------------------ timing, memory


def time_round_robin(variants: list[Variant], repeats: int) -> None:
  for v in variants:  # one untimed warm call each (allocations, caches)
    jax.block_until_ready(v.call())
  for i in range(repeats):
    order = variants if i % 2 == 0 else variants[::-1]
    for v in order:
      t0 = time.perf_counter()
      jax.block_until_ready(v.call())
      v.times.append(time.perf_counter() - t0)


def memory_of(v: Variant) -> dict[str, int | None]:
  try:
    m = v.compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backend may not implement it
    m = None
  if m is None:
    return {"available": False}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {k: int(getattr(m, k, 0) or 0) for k in keys}
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  out["available"] = True
  return out


def device_peak() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def cost_of(v: Variant) -> dict[str, float]:
  try:
    c = v.compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backend may not implement it
    return {}
  c = c[0] if isinstance(c, (list, tuple)) and c else c
  return {k: float(c[k]) for k in ("flops", "bytes accessed") if c and k in c}


def row(v: Variant) -> dict[str, Any]:
  t = np.asarray(v.times)
  return {"name": v.name, "what": v.what, "median_ms": float(np.median(t) * 1e3),
          "min_ms": float(t.min() * 1e3), "p25_ms": float(np.percentile(t, 25) * 1e3),
          "p75_ms": float(np.percentile(t, 75) * 1e3), "repeats": len(t),
          "compile_s": v.compile_s, "trainable_params": v.trainable, "memory": memory_of(v), "cost": cost_of(v),
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
      "mos_over_base_fwd_bwd": ms["MoS step"] / ms["base fwd+bwd"],
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


def fmt_mib(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:8.2f}"


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
                 f"{fmt_mib(m.get('peak_estimate_bytes')):>9} {fmt_mib(m.get('temp_size_in_bytes')):>9} "
                 f"{gflop(r['cost']):>8}")
  lines.append("")
  lines += [f"  {r['name']:<17} {r['what']}" for r in rows.values()]
  lines.append("")
  lines += [f"{k:<34} {v:.4f}" for k, v in ratio.items()]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def main() -> None:
  args = parse_args()
  s = sizes_from(args)
  mcfg = mos_config(s)
  check_fits(mcfg, s.layers)
  print(f"sizes: {dataclasses.asdict(s)}")
  print(f"MoS: r={mcfg.rank} r_e={mcfg.equivalent_rank} r_p={mcfg.private_rank} "
        f"l={mcfg.shards_per_vector}; LoRA: r={s.rank}; env: {environment()}", flush=True)

  model = build_model(s)
  params, batch, loss_fn = model.params, make_batch(s), make_loss_fn(model)
  variants = base_variants(loss_fn, params, batch)
  lora, _ = step_variant("LoRA step", f"make_train_step adamw, MoSConfig.lora({s.rank})",
                         loss_fn, params, batch, mos_jax.MoSConfig.lora(s.rank))
  mos, adapter = step_variant("MoS step", f"make_train_step adamw, MoS r={mcfg.rank} "
                              f"r_e={mcfg.equivalent_rank} l={mcfg.shards_per_vector} r_p=0",
                              loss_fn, params, batch, mcfg)
  variants += [lora, mos, factor_step_variant(loss_fn, params, batch, adapter),
               *assembly_variants(adapter)]
  print("compiled: " + ", ".join(f"{v.name} {v.compile_s:.1f}s" for v in variants), flush=True)

  time_round_robin(variants, s.repeats)
  rows = {v.name: row(v) for v in variants}
  ratio = ratios(rows)
  print(table(rows, ratio))
  peak = device_peak()
  if peak is not None:
    print(f"device peak_bytes_in_use (whole process, all variants): {fmt_mib(peak)} MiB")

  result = {"sizes": dataclasses.asdict(s), "quick": args.quick,
            "mos_config": dataclasses.asdict(mcfg) | {"target_modules": list(mcfg.target_modules)},
            "lora_config": {"rank": s.rank, "equivalent_rank": s.rank, "private_rank": s.rank},
            "base_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
            "environment": environment(), "device_peak_bytes_in_use": peak,
            "rows": rows, "ratios": ratio,
            "targets": {"mos_over_lora_step_max": 1.05, "assemble_over_mos_step_max": 0.01}}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
