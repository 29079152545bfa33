"""GSM8K with MoS: fine-tune a Flax Llama on the train split, report test exact match.

Data: GSM8K JSONL (`{"question", "answer"}`, the answer ending in `#### N`) from --data-dir
(default: $MOS_DATA_DIR/gsm8k, else ../shared/data/gsm8k beside the repo), else from HF
`datasets` with --allow-network, else generated arithmetic word problems in the same format.
Model: --model tiny (a small random Llama with a BPE tokenizer trained on the data, which
is what 2 CPU cores can run), a local HF folder, or a hub name (with network).

    .venv/bin/python -m experiments.gsm8k --model tiny --steps 300        # CPU, minutes

On a GPU/TPU host with LLaMA2-7B (the paper's setting, spec §7: alpha 16, dropout 0.1,
lr 2e-4, linear schedule, 3% warmup, grad-norm clip 0.3, seq len 512, batch 16, bf16):

    python -m experiments.gsm8k --model meta-llama/Llama-2-7b-hf --allow-network --preset paper \\
        --rank 8 --equivalent-rank 1 --shards-per-vector 2 --steps 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

import mos_jax
import mos_jax.hf
from experiments.lib import cli
from experiments.lib.config import TrainConfig
from experiments.lib.gsm8k_data import Pair, exact_match, final_number, get_data
from experiments.lib.lm import decode_new, encode, left_pad_prompts, train_lm
from experiments.lib.models import load_causal_lm, tiny_llama, train_tokenizer
from experiments.lib.paths import default_data_dir


def load_pretrained(name_or_path: str, *, allow_network: bool, dtype: Any) -> tuple[Any, Any]:
  """A Flax Llama and its tokenizer from a local HF folder (PyTorch safetensors are fine) or the hub."""
  from transformers import AutoTokenizer
  model = load_causal_lm(name_or_path, allow_network=allow_network, dtype=dtype)
  tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=Path(name_or_path).is_dir())
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return model, tokenizer


def evaluate_generation(model: Any, params: Any, tokenizer: Any, pairs: Sequence[Pair], *,
                        adapter: mos_jax.Adapter | None, batch_size: int = 32,
                        max_new_tokens: int = 96) -> tuple[float, list[str]]:
  """Greedy answers for ``pairs``' questions and their exact-match accuracy."""
  predictions = []
  for i in range(0, len(pairs), batch_size):
    chunk = pairs[i:i + batch_size]
    ids, mask = left_pad_prompts(tokenizer, [q for q, _ in chunk])
    out = mos_jax.hf.generate(model, params, jnp.asarray(ids), adapter=adapter, attention_mask=jnp.asarray(mask),
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    predictions += decode_new(tokenizer, out, ids.shape[1])
  return exact_match(predictions, [a for _, a in pairs]), predictions


@dataclasses.dataclass(frozen=True)
class Preset:
  lr: float
  warmup_frac: float
  clip_norm: float
  max_len: int
  batch_size: int
  dropout: float
  compute_dtype: str


PRESETS = {
    "cpu": Preset(lr=3e-3, warmup_frac=0.03, clip_norm=1.0, max_len=256, batch_size=16, dropout=0.0,
                  compute_dtype="float32"),
    "paper": Preset(lr=2e-4, warmup_frac=0.03, clip_norm=0.3, max_len=512, batch_size=16, dropout=0.1,
                    compute_dtype="bfloat16"),
}


def build_parser() -> argparse.ArgumentParser:
  """The command line (``--help`` lists every flag with its default)."""
  parser = cli.parser(__doc__)
  parser.add_argument("--model", default="tiny", help="'tiny', a local HF folder, or a hub name")
  parser.add_argument("--data-dir", default=default_data_dir("gsm8k"),
                      help="folder with GSM8K's train.jsonl and test.jsonl")
  parser.add_argument("--allow-network", action="store_true",
                      help="download the data (HF datasets) and the model (hub) when not local")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                      help="optimizer, lengths and dtype: 'cpu' (small, float32) or 'paper' (spec section 7, bf16)")
  parser.add_argument("--steps", type=int, default=300, help="training steps")
  parser.add_argument("--rank", type=int, default=8, help="MoS active rank r")
  parser.add_argument("--equivalent-rank", type=int, default=2,
                      help="the LoRA rank whose parameter count MoS gets (sets the pool sizes)")
  parser.add_argument("--private-rank", type=int, default=0, help="r_p: rank vectors private to each layer")
  parser.add_argument("--shards-per-vector", type=int, default=2, help="l: shards concatenated into each vector")
  parser.add_argument("--train-limit", type=int, default=None, help="use the first N training problems (all if unset)")
  parser.add_argument("--eval-limit", type=int, default=100, help="evaluate on the first N test problems")
  parser.add_argument("--max-new-tokens", type=int, default=96, help="generated tokens per answer at evaluation")
  parser.add_argument("--seed", type=int, default=0, help="seed of the data order, the routing and the tiny model")
  parser.add_argument("--out", default="runs/gsm8k", help="output folder")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  preset = PRESETS[args.preset]

  start = time.perf_counter()
  train_pairs, test_pairs, source = get_data(args.data_dir, allow_network=args.allow_network, seed=args.seed)
  train_pairs = train_pairs[:args.train_limit] if args.train_limit else train_pairs
  test_pairs = test_pairs[:args.eval_limit]
  if args.model == "tiny":
    tokenizer = train_tokenizer([q + " " + a for q, a in train_pairs])
    model = tiny_llama(tokenizer, seed=args.seed)
  else:
    model, tokenizer = load_pretrained(args.model, allow_network=args.allow_network,
                                       dtype=jnp.dtype(preset.compute_dtype))
  mos = mos_jax.MoSConfig(rank=args.rank, equivalent_rank=args.equivalent_rank, private_rank=args.private_rank,
                          shards_per_vector=args.shards_per_vector, alpha=16.0, dropout=preset.dropout,
                          seed=args.seed)
  cfg = TrainConfig(mos=mos, lr=preset.lr, warmup_frac=preset.warmup_frac, clip_norm=preset.clip_norm,
                    steps=args.steps, batch_size=preset.batch_size, eval_every=max(1, args.steps // 5),
                    seed=args.seed, compute_dtype=preset.compute_dtype, out_dir=args.out)
  print(f"data: {source}: {len(train_pairs)} train / {len(test_pairs)} test problems")
  print(mos_jax.dry_run(model.params, mos).split("\n", 1)[0])
  train_data = encode(tokenizer, train_pairs, preset.max_len, skip_long=True)
  eval_data = encode(tokenizer, test_pairs, preset.max_len, skip_long=True)
  result = train_lm(model, model.params, train_data, eval_data, cfg, name="gsm8k MoS")
  print(mos_jax.summary(result["adapter"]))
  accuracy, predictions = evaluate_generation(model, model.params, tokenizer, test_pairs, adapter=result["adapter"],
                                              max_new_tokens=args.max_new_tokens)
  Path(args.out, "predictions.jsonl").write_text("".join(
      json.dumps({"question": q, "reference": a, "prediction": p}) + "\n"
      for (q, a), p in zip(test_pairs, predictions)))
  print(f"\nGSM8K exact match on {len(test_pairs)} test problems: {accuracy:.3f}")
  print(f"example: Q: {test_pairs[0][0]}\n  predicted: {predictions[0]!r}\n  reference: {final_number(test_pairs[0][1])}")
  print(f"outputs in {args.out} (metrics.jsonl, curves.png, adapter.safetensors, predictions.jsonl); "
        f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  main()
