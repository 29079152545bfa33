"""Quantized frozen base: does on-the-fly dequantization keep a MoS step's memory small?

On a small HF Flax Llama (GQA, MoS over the seven projections, adamw) this
compiles one train step per variant of the frozen base:

  f32 base            float32 params = compute dtype: no conversion at all (the
                      floor for temporaries; only with --compute float32).
  bf16 base           bfloat16 params.
  int8 upfront        int8 kernels; mos_jax.linen.dequantize(qparams, compute dtype)
                      on the whole tree at the top of the jitted loss.
  int8 per-layer      int8 kernels passed to the model; dequantized_dense()
                      dequantizes each nn.Dense kernel when it is called and
                      again in the backward pass (custom_vjp).
  int8 per-layer, saved   the same with recompute=False: JAX saves each
                      dequantized kernel for the backward pass.
  int8 per-layer, checkpoint   per-layer dequantize-and-matmul under plain
                      jax.checkpoint (what one would try first).
  nf4 per-layer       NF4 (4-bit, blocks of 64) kernels, per-layer with recompute.

For each: bytes of the base as a step argument, XLA's compiled memory
analysis (arguments, outputs, temporaries; peak estimate = arguments +
outputs - donated aliases + temporaries), median step time with the variants
interleaved round-robin (and, against the reference, the median of per-round ratios with a 95%
bootstrap interval), the load average before and after, and the loss trajectory (every variant trains the
same pools on the same batch, so losses should track the float base's).

The question it answers: with the base dequantized inside the step, is the
extra "temp" memory a layer's worth of dequantized weights (saving real) or
a full-precision copy of the whole base (saving lost)? On CPU there is no
device peak counter, so the compiled analysis is the evidence.

Compute dtype: XLA:CPU runs bf16 matmuls by upcasting both operands to f32,
so with --compute bfloat16 on CPU every variant, the bf16 base included,
materialises f32 copies of its kernels and the rows cannot be told apart.
The default is therefore float32 on CPU (bfloat16 on GPU/TPU).

Run (about 2-3 minutes on 2 CPU cores):
  .venv/bin/python -m experiments.bench_quantized
  .venv/bin/python -m experiments.bench_quantized --quick   # smoke run, under a minute (compiles dominate)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments.lib import bench
from experiments.lib.bench import mib, tree_bytes
from mos_jax.linen import (dense_on_quantized, dequantize, dequantized_dense, intercept_kernel_calls, is_quantized,
                           module_input, quantize, quantized_bytes)


@dataclasses.dataclass
class Sizes:
  hidden: int = 512
  intermediate: int = 1376
  layers: int = 8
  heads: int = 8
  kv_heads: int = 4
  vocab: int = 2048
  batch: int = 4
  seq: int = 128
  rank: int = 8
  shards_per_vector: int = 2
  repeats: int = 8


QUICK = Sizes(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=256,
              batch=2, seq=16, rank=2, repeats=3)


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-nf4", action="store_true", help="skip the NF4 variant")
    p.add_argument("--compute", choices=("float32", "bfloat16"), default=None,
                   help="model compute dtype (default: float32 on CPU, bfloat16 on accelerators)")

  return bench.bench_parser(__doc__, out_file="bench_quantized.json",
                               quick_help="tiny 2-layer model, 3 repeats (smoke test)",
                               repeats_help="timed steps per variant (default 8)", extra=extra).parse_args()


# ---------------------------------------------------------------- model, loss


@contextlib.contextmanager
def checkpointed_dense() -> Iterator[None]:
  """Per-layer dequantization under plain ``jax.checkpoint`` (comparison only; bias-free layers)."""
  def handle(module, next_fun, args, kwargs):
    node = module.get_variable("params", "kernel") if isinstance(module, nn.Dense) else None
    if not is_quantized(node):
      return next_fun(*args, **kwargs)
    dense = functools.partial(dense_on_quantized, dtype=module.dtype, precision=module.precision,
                              promote=module.promote_dtype, dot_general=jax.lax.dot_general)
    return jax.checkpoint(dense)(module_input(args, kwargs), node, None)

  with intercept_kernel_calls(handle):
    yield


def make_loss_fn(model, mode: str, compute: Any) -> Callable[[Any, Any], jax.Array]:
  """``mode``: "plain", "upfront", "per-layer", "per-layer-saved" or "per-layer-checkpoint"."""
  def logits_of(params, ids):
    if mode == "plain":
      return model(ids, params=params, train=False).logits
    if mode == "upfront":
      return model(ids, params=dequantize(params, compute), train=False).logits
    ctx = checkpointed_dense() if mode == "per-layer-checkpoint" else \
        dequantized_dense(recompute=mode == "per-layer")
    with ctx:
      return model(ids, params=params, train=False).logits

  def loss_fn(params, batch):
    ids = batch["input_ids"]
    return bench.next_token_loss(logits_of(params, ids), ids)
  return loss_fn


# ------------------------------------------------------------------- variants


@dataclasses.dataclass
class StepVariant(bench.Variant):
  """A train step over one form of the base, with that base's size and the loss of every call."""

  base_bytes: int = 0
  losses: list[float] = dataclasses.field(default_factory=list)

  def call(self) -> Any:
    """One step; its loss is recorded (the warm-up call's is step 0's)."""
    out = super().call()
    self.losses.append(float(out[2]))
    return out


def make_variant(name: str, what: str, model, mode: str, base: Any, batch: Any,
                 config: mos_jax.MoSConfig, shapes: Any, compute: Any) -> StepVariant:
  adapter = mos_jax.adapt(shapes, config)  # same seed: identical pools and routing for all
  return bench.train_step_variant(name, what, mos_jax.linen.adapted_loss(make_loss_fn(model, mode, compute)),
                                  adapter, base, batch, cls=StepVariant, base_bytes=tree_bytes(base))


def row(v: StepVariant) -> dict[str, Any]:
  t = np.asarray(v.times) * 1e3
  return {"name": v.name, "what": v.what, "base_bytes": v.base_bytes, "memory": bench.compiled_memory(v.compiled),
          "median_ms": float(np.median(t)), "min_ms": float(t.min()), "compile_s": v.compile_s,
          "losses": v.losses, "times_ms": t.tolist()}


# --------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'variant':<28} {'base MiB':>9} {'arg MiB':>8} {'temp MiB':>9} {'out MiB':>8} "
          f"{'peak MiB':>9} {'median ms':>10} {'loss 0':>8} {'loss N':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    m = r["memory"]
    lines.append(f"{r['name']:<28} {mib(r['base_bytes']):>9} {mib(m.get('argument_size_in_bytes')):>8} "
                 f"{mib(m.get('temp_size_in_bytes')):>9} {mib(m.get('output_size_in_bytes')):>8} "
                 f"{mib(m.get('peak_estimate_bytes')):>9} {r['median_ms']:>10.1f} "
                 f"{r['losses'][0]:>8.4f} {r['losses'][-1]:>8.4f}")
  lines.append("")
  lines += [f"  {r['name']:<28} {r['what']}" for r in rows]
  return "\n".join(lines)


def findings(rows: dict[str, dict[str, Any]], ref: str, kernels_bytes: int,
             layer_bytes: int) -> dict[str, Any]:
  """Temporaries and peak relative to ``ref``, the base stored in the compute dtype.

  ``kernels_bytes``/``layer_bytes``: the quantized kernels, and one decoder
  layer's projections, in the compute dtype: what a full dequantized copy of
  the base, or of one layer, costs.
  """
  base = rows[ref]
  out: dict[str, Any] = {"reference": ref, "dequantized_kernels_bytes": kernels_bytes,
                         "one_layer_bytes": layer_bytes}
  if not base["memory"].get("available"):
    return out
  for name, r in rows.items():
    m = r["memory"]
    if name == ref or not m.get("available"):
      continue
    extra = m["temp_size_in_bytes"] - base["memory"]["temp_size_in_bytes"]
    out[name] = {
        "extra_temp_bytes": extra,
        "extra_temp_over_dequantized_kernels": extra / kernels_bytes,
        "extra_temp_over_one_layer": extra / layer_bytes,
        "peak_over_reference_peak": m["peak_estimate_bytes"] / base["memory"]["peak_estimate_bytes"],
        "base_bytes_over_reference": r["base_bytes"] / base["base_bytes"],
        "final_loss_minus_reference": r["losses"][-1] - base["losses"][-1],
        "time_over_reference": bench.paired_ratio(r["times_ms"], base["times_ms"]),
    }
  return out


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  s = bench.sizes_from(args, Sizes(), QUICK)
  compute_name = args.compute or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  compute = jnp.dtype(compute_name)
  config = mos_jax.MoSConfig(rank=s.rank, equivalent_rank=1, shards_per_vector=s.shards_per_vector)
  print(f"sizes: {dataclasses.asdict(s)}; compute: {compute_name}; env: {bench.environment()}", flush=True)

  # nn.Dense casts kernels to the compute dtype; dequantization targets it directly.
  model = bench.build_llama(s, dtype=compute)
  params32 = model.params
  bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params32)
  # Quantize from the float32 weights: the codes do not inherit bf16 rounding.
  int8 = quantize(params32, min_size=4096)
  nf4 = quantize(params32, scheme="nf4", min_size=4096)
  shapes = jax.eval_shape(lambda: params32)
  batch = bench.random_batch(s)
  qb = quantized_bytes(int8)
  kernels_bytes = qb.original // 4 * compute.itemsize  # quantized from float32
  layer0 = params32["model"]["layers"]["0"]
  layer_bytes = tree_bytes({k: v for k, v in layer0.items() if k in ("self_attn", "mlp")}) // 4 * compute.itemsize
  print(f"int8: {qb.num_quantized} kernels, {mib(qb.quantized)} MiB (in {compute_name}: {mib(kernels_bytes)} MiB); "
        f"nf4: {mib(quantized_bytes(nf4).quantized)} MiB; one layer's projections in {compute_name}: "
        f"{mib(layer_bytes)} MiB", flush=True)

  specs = [("bf16 base", "bf16 params", "plain", bf16),
           ("int8 upfront", f"dequantize(qparams, {compute_name}) on the whole tree in the loss", "upfront", int8),
           ("int8 per-layer", "dequantized_dense(): per nn.Dense call, again in backward", "per-layer", int8),
           ("int8 per-layer, saved", "dequantized_dense(recompute=False)", "per-layer-saved", int8),
           ("int8 per-layer, checkpoint", "per nn.Dense call under plain jax.checkpoint", "per-layer-checkpoint",
            int8)]
  if compute_name == "float32":
    specs.insert(0, ("f32 base", "float32 params: no conversion (floor)", "plain", params32))
  if not args.no_nf4:
    specs.append(("nf4 per-layer", "NF4 blocks of 64, dequantized_dense()", "per-layer", nf4))
  with jax.numpy_rank_promotion("allow"):
    variants = []
    for name, what, mode, base in specs:
      variants.append(make_variant(name, what, model, mode, base, batch, config, shapes, compute))
      print(f"compiled {name}: {variants[-1].compile_s:.1f}s", flush=True)
    bench.time_variants(variants, s.repeats)

  rows = {v.name: row(v) for v in variants}
  print(table(list(rows.values())))
  ref = specs[0][0]
  found = findings(rows, ref, kernels_bytes, layer_bytes)
  print(f"\nextra temporaries over {ref!r}, in units of the whole dequantized base "
        f"({mib(kernels_bytes)} MiB) and of one layer ({mib(layer_bytes)} MiB):")
  for name, f in found.items():
    if isinstance(f, dict):
      print(f"  {name:<28} {mib(f['extra_temp_bytes']):>7} MiB = {f['extra_temp_over_dequantized_kernels']:5.2f} "
            f"bases = {f['extra_temp_over_one_layer']:5.2f} layers; peak {f['peak_over_reference_peak']:.2f}x; "
            f"final loss {f['final_loss_minus_reference']:+.4f}; time {bench.fmt_ratio(f['time_over_reference'], 2)}x")

  result = {"sizes": dataclasses.asdict(s), "quick": args.quick, "compute_dtype": compute_name,
            "mos_config": {"rank": config.rank, "equivalent_rank": config.equivalent_rank,
                           "shards_per_vector": config.shards_per_vector,
                           "target_modules": list(config.target_modules)},
            "quantized_int8": dataclasses.asdict(qb), "quantized_nf4": dataclasses.asdict(quantized_bytes(nf4)),
            "environment": bench.environment(), "rows": rows, "findings": found}
  bench.write_json(args.out, result, run)


if __name__ == "__main__":
  main()
