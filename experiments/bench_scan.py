"""Scanned vs unrolled layers under MoS: compile time, step time, and whether the scan copies the base.

A small Llama-shaped linen decoder (RMSNorm, causal multi-head attention with q/k/v/o, gated MLP)
of L = 8, 16, 32 layers, MoS (r=8, r_e=1, l=2) on all seven projections, AdamW. The same weights
are run two ways: ``nn.scan`` over one block (params stacked on the layer axis, the factors attached
beside the kernels by ``mos_jax.linen.with_factors``, pools gathered once outside the scan) and unrolled
(one module per layer). For each L the script prints compile and step time of both and XLA's
memory analysis of the scanned MoS step against the scanned frozen forward+backward (gradient
w.r.t. the input activations only), and the same difference unrolled. The trap this guards
against (MaxText issue #5129): an adapter under scan that silently copies the whole base stack.
Step-time ratios (scanned / unrolled, scanned MoS / scanned frozen) are medians of per-round ratios
with 95% bootstrap intervals; the load average before and after is recorded.
The check is ``peak(MoS step) - peak(frozen fwd+bwd) <= adapter state + the low-rank terms'
activations`` (their inputs, which dA needs and a frozen input-gradient pass does not keep, and
``x Aᵀ``), with the base stack's size printed beside it for scale.

    .venv/bin/python -m experiments.bench_scan            # L = 8, 16, 32 (a few minutes on 2 cores)
    .venv/bin/python -m experiments.bench_scan --threads 1
    .venv/bin/python -m experiments.bench_scan --quick    # L = 8, 16
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib import bench

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class Sizes:
  layers: tuple[int, ...] = (8, 16, 32)
  hidden: int = 128
  intermediate: int = 256
  heads: int = 4
  batch: int = 4
  seq: int = 64
  repeats: int = 5


QUICK = Sizes(layers=(8, 16), repeats=2)


class Block(nn.Module):
  """One Llama-shaped decoder block (no rotary embedding: it changes no shapes or costs that matter here)."""

  dims: tuple[int, int, int]  # hidden, intermediate, heads

  @nn.compact
  def __call__(self, x, _):
    hidden, intermediate, heads = self.dims
    h = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    q, k, v = (nn.Dense(hidden, use_bias=False, name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
    split = lambda t: t.reshape(t.shape[:2] + (heads, hidden // heads))
    scores = jnp.einsum("bthd,bshd->bhts", split(q), split(k)) / np.sqrt(hidden // heads)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", attn, split(v)).reshape(x.shape)
    x = x + nn.Dense(hidden, use_bias=False, name="o_proj")(out)
    h = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    gate = nn.silu(nn.Dense(intermediate, use_bias=False, name="gate_proj")(h))
    up = nn.Dense(intermediate, use_bias=False, name="up_proj")(h)
    return x + nn.Dense(hidden, use_bias=False, name="down_proj")(gate * up), None


class Scanned(nn.Module):
  dims: tuple[int, int, int]
  num: int

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.num)
    return stack(self.dims, name="layers")(x, None)[0]


class Layers(nn.Module):
  dims: tuple[int, int, int]
  num: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num):
      x = Block(self.dims, name=str(i))(x, None)[0]
    return x


class Unrolled(nn.Module):
  dims: tuple[int, int, int]
  num: int

  @nn.compact
  def __call__(self, x):
    return Layers(self.dims, self.num, name="layers")(x)


def loss_of(model: nn.Module):
  def loss_fn(params, x):
    return (model.apply({"params": params}, x) ** 2).mean()
  return loss_fn


def unroll(params: Any, num: int) -> Any:
  return {"layers": {str(i): jax.tree_util.tree_map(lambda v: v[i], params["layers"]) for i in range(num)}}


def config(stacked: bool) -> mos_jax.MoSConfig:
  return mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, target_modules=PROJECTIONS,
                           stacked_modules=PROJECTIONS if stacked else None)


def nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(s: Sizes, num: int) -> dict[str, Any]:
  x = jax.random.normal(jax.random.key(0), (s.batch, s.seq, s.hidden))
  dims = (s.hidden, s.intermediate, s.heads)
  scanned_model, unrolled_model = Scanned(dims, num), Unrolled(dims, num)
  params = scanned_model.init(jax.random.key(1), x)["params"]
  flat = unroll(params, num)
  adapter_s, adapter_u = mos_jax.adapt(params, config(True)), mos_jax.adapt(flat, config(False))
  adapted_loss = lambda m: mos_jax.linen.adapted_loss(loss_of(m))
  v_scan = bench.train_step_variant("scanned MoS step", "nn.scan, factors attached", adapted_loss(scanned_model),
                                    adapter_s, params, x)
  v_unroll = bench.train_step_variant("unrolled MoS step", "one module per layer", adapted_loss(unrolled_model),
                                      adapter_u, flat, x)
  frozen = lambda m: jax.jit(jax.value_and_grad(lambda inp, p: loss_of(m)(p, inp)))
  v_frozen = bench.compile_variant("scanned frozen fwd+bwd", "grad w.r.t. the input only", frozen(scanned_model),
                                   (), (x, params))
  v_frozen_u = bench.compile_variant("unrolled frozen fwd+bwd", "grad w.r.t. the input only",
                                     frozen(unrolled_model), (), (x, flat))
  bench.time_variants([v_scan, v_unroll, v_frozen], s.repeats)
  mem = {v.name: bench.compiled_memory(v.compiled) for v in (v_scan, v_unroll, v_frozen, v_frozen_u)}
  ratios = {"scanned_over_unrolled": bench.paired_ratio(v_scan.times, v_unroll.times),
            "scanned_over_frozen_scanned": bench.paired_ratio(v_scan.times, v_frozen.times)}
  pools = nbytes(adapter_s.pools)
  factors = sum(num * 8 * (g.d_in + g.d_out) * 4 for g in adapter_s.groups)
  # What the low-rank terms must keep for the backward pass, per layer and adapted projection: its
  # input x (dA needs it; a frozen input-gradient pass does not) and h = x Aᵀ (tokens x r). Counted
  # per projection, so inputs shared by q/k/v and gate/up count several times: an upper bound.
  tokens = s.batch * s.seq
  lowrank = num * tokens * 4 * sum(g.d_in + 8 for g in adapter_s.groups)
  budget = 3 * pools + 2 * factors + lowrank  # pools + 2 AdamW moments, factors and their gradient
  row = {"layers": num, "compile_s": {"scanned": v_scan.compile_s, "unrolled": v_unroll.compile_s},
         "step_s": {"scanned": float(np.median(v_scan.times)), "unrolled": float(np.median(v_unroll.times)),
                    "frozen_fwd_bwd_scanned": float(np.median(v_frozen.times))},
         "ratios": ratios, "memory": mem, "base_stack_bytes": nbytes(params), "adapter_budget_bytes": budget}
  if all(m.get("available") for m in mem.values()):
    peak = {k: m["peak_estimate_bytes"] for k, m in mem.items()}
    row["extra_peak_bytes"] = peak["scanned MoS step"] - peak["scanned frozen fwd+bwd"]
    row["extra_peak_unrolled_bytes"] = peak["unrolled MoS step"] - peak["unrolled frozen fwd+bwd"]
    row["no_base_copy"] = row["extra_peak_bytes"] <= budget
  return row


def table(rows: list[dict[str, Any]]) -> str:
  lines = [f"{'L':>3} {'compile scan':>12} {'compile unrolled':>16} {'step scan':>10} {'step unrolled':>13} "
           f"{'scan / unrolled [95% CI]':>25} {'frozen f+b':>10} {'extra peak scan':>15} {'unrolled':>9} {'budget':>9} "
           f"{'base stack':>10} {'no copy':>8}",
           f"{'':>3} {'s':>12} {'s':>16} {'ms':>10} {'ms':>13} {'':>25} {'ms':>10} {'MiB':>15} {'MiB':>9} {'MiB':>9} "
           f"{'MiB':>10}"]
  for r in rows:
    lines.append(f"{r['layers']:>3} {r['compile_s']['scanned']:>12.2f} {r['compile_s']['unrolled']:>16.2f} "
                 f"{1e3 * r['step_s']['scanned']:>10.1f} {1e3 * r['step_s']['unrolled']:>13.1f} "
                 f"{bench.fmt_ratio(r['ratios']['scanned_over_unrolled']):>25} "
                 f"{1e3 * r['step_s']['frozen_fwd_bwd_scanned']:>10.1f} "
                 f"{bench.mib(r.get('extra_peak_bytes')):>15} {bench.mib(r.get('extra_peak_unrolled_bytes')):>9} "
                 f"{bench.mib(r['adapter_budget_bytes']):>9} "
                 f"{bench.mib(r['base_stack_bytes']):>10} {str(r.get('no_base_copy', 'n/a')):>8}")
  return "\n".join(lines)


def main() -> None:
  parser = bench.bench_parser(__doc__, out_file="bench_scan.json", quick_help="L = 8, 16 and 2 repeats",
                              repeats_help="timed calls per variant")
  args = parser.parse_args()
  run = bench.run_info(args)
  s = bench.sizes_from(args, Sizes(), QUICK)
  rows = [measure(s, num) for num in s.layers]
  print(f"device: {bench.device_summary()}")
  print(table(rows))
  bench.write_json(args.out, {"sizes": dataclasses.asdict(s), "environment": bench.environment(), "rows": rows}, run)


if __name__ == "__main__":
  main()
