"""Served generation on the real Gemma 3 270M: 4 MoS adapters and base rows in one batch, row by row against each alone.

Loads the pretrained Gemma 3 270M (Tunix NNX, float32; ``experiments.lib.gemma3_weights``), makes ``--adapters``
adapters of one routing with random non-zero pools (std ``--scale``), serves a batch of 6 prompts
(rows using adapters 0..3 and the base model, ``-1``) through ``mos_jax.nnx.serve`` and Tunix's
``Sampler`` (greedy, ``--steps`` tokens), and checks each row's tokens against the same batch run by
its adapter alone (``mos_jax.nnx.adapt``) or by the base model
(``experiments.lib.serving.check_served_generation``). Exits 1 when a row differs. Writes
experiments/results/serve_gemma3.json (``--out``): per row the adapter, the tokens and texts, whether
they equal the adapter alone, whether the adapter changed them from the base model; the samplers'
wall times.

  .venv/bin/python -m experiments.serve_gemma3
"""

from __future__ import annotations

import argparse
import sys
import time

import mos_jax
from experiments.lib import bench, gemma3_weights, sampling, serving

PROMPTS = ("The capital of France is", "Once upon a time", "The best way to learn a language is",
           "def fibonacci(n):", "My favourite season is", "Water boils at")
ADAPTER_IDS = (0, 1, -1, 2, 3, 0)


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--adapters", type=int, default=4, help="adapters in the stack (default 4; rows use 0..3)")
  p.add_argument("--scale", type=float, default=0.03, help="std of the random pools (default 0.03)")
  p.add_argument("--steps", type=int, default=12, help="greedy tokens generated per row (default 12)")
  p.add_argument("--cache-dir", default=None, help="where the converted Gemma weights are cached")
  p.add_argument("--out", default=bench.results_path("serve_gemma3.json"), help="JSON output path")
  args = p.parse_args()
  if args.adapters < max(ADAPTER_IDS) + 1:
    p.error(f"--adapters must be at least {max(ADAPTER_IDS) + 1}: the rows use adapters {sorted(set(ADAPTER_IDS))}.")
  return args


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  t0 = time.perf_counter()
  model, tokenizer = gemma3_weights.load_gemma3_270m(args.cache_dir)
  print(f"Gemma 3 270M loaded in {time.perf_counter() - t0:.0f} s", flush=True)
  config = mos_jax.MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, target_modules=mos_jax.nnx.GEMMA3_TARGETS)
  adapters = serving.random_adapters(model, config, args.adapters, args.scale)
  cache = sampling.cache_config(model, sampling.needed_cache_size(tokenizer, PROMPTS, args.steps))
  rows, seconds = serving.check_served_generation(model, tokenizer.sp, adapters, PROMPTS, ADAPTER_IDS, cache,
                                                  max_generation_steps=args.steps, eos_tokens=list(tokenizer.stop_ids))
  for r in rows:
    print(f"row {r.row} adapter {r.adapter:>2}: {'equal' if r.equal else 'DIFFERENT'}"
          f"{', changed from base' if r.changed else ''}: {r.prompt!r} -> {tokenizer.decode(r.served)!r}")
  ok = all(r.equal for r in rows)
  changed = sum(r.changed for r in rows if r.adapter >= 0)
  print(f"{'all rows equal' if ok else 'ROWS DIFFER'}; {changed} of {sum(r.adapter >= 0 for r in rows)} adapter rows "
        f"changed from the base model; sampler seconds {', '.join(f'{k} {v:.1f}' for k, v in seconds.items())}")
  bench.write_json(args.out, {
      "model": "Gemma 3 270M (Tunix NNX, float32)", "mos_config": {"rank": 8, "equivalent_rank": 1,
                                                                  "shards_per_vector": 2, "pool_std": args.scale},
      "steps": args.steps, "all_rows_equal": ok, "adapter_rows_changed": changed, "sampler_seconds": seconds,
      "rows": [{"row": r.row, "adapter": r.adapter, "prompt": r.prompt, "equal": r.equal,
                "changed_from_base": r.changed,
                "served_tokens": r.served, "alone_tokens": r.alone, "served_text": tokenizer.decode(r.served),
                "base_text": tokenizer.decode(r.base)} for r in rows]}, run)
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()
