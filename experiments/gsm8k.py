"""GSM8K with MoS: fine-tune a Flax Llama on the train split, report test exact match.

Data: GSM8K JSONL (`{"question", "answer"}`, the answer ending in `#### N`) from --data-dir
(default: $MOS_DATA_DIR/gsm8k, else ../shared/data/gsm8k beside the repo), else from HF
`datasets` with --allow-network, else generated arithmetic word problems in the same format.
Model: --model tiny (a small random Llama with a BPE tokenizer trained on the data, which
is what 2 CPU cores can run), a local HF folder, or a hub name (with network).

    .venv/bin/python experiments/gsm8k.py --model tiny --steps 300        # CPU, minutes

On a GPU/TPU host with LLaMA2-7B (the paper's setting, spec §7: alpha 16, dropout 0.1,
lr 2e-4, linear schedule, 3% warmup, grad-norm clip 0.3, seq len 512, batch 16, bf16):

    python experiments/gsm8k.py --model meta-llama/Llama-2-7b-hf --allow-network --preset paper \\
        --rank 8 --equivalent-rank 1 --shards-per-vector 2 --steps 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from causal_lm import decode_new, encode, left_pad_prompts, load_causal_lm, train_lm
from trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Pair = tuple[str, str]


def final_number(text: str) -> str | None:
  """The number after the last ``####`` (else the last number in the text), normalised.

  Commas and a trailing ``.0`` are dropped so ``1,000`` == ``1000`` == ``1000.0``.
  """
  tail = text.rsplit("####", 1)[1] if "####" in text else text
  found = _NUMBER.findall(tail) if "####" in text else _NUMBER.findall(text)[-1:]
  if not found:
    return None
  value = found[0].replace(",", "")
  return value[:-2] if value.endswith(".0") else value


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions whose final number equals the reference's."""
  hits = [final_number(p) is not None and final_number(p) == final_number(r)
          for p, r in zip(predictions, references, strict=True)]
  return float(np.mean(hits)) if hits else 0.0


def load_jsonl(path: Path) -> list[Pair]:
  """GSM8K rows as (question, answer); clear errors for missing/empty/malformed files."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file. Point --data-dir at a folder with train.jsonl and test.jsonl.")
  pairs = []
  for lineno, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not JSON ({e}).") from e
    if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
      raise ValueError(f"{path}:{lineno}: expected keys 'question' and 'answer', got "
                       f"{sorted(row) if isinstance(row, dict) else type(row).__name__}.")
    if final_number(row["answer"]) is None or "####" not in row["answer"]:
      raise ValueError(f"{path}:{lineno}: the answer has no final '#### <number>'.")
    pairs.append((row["question"].strip(), row["answer"].strip()))
  if not pairs:
    raise ValueError(f"{path}: empty file, no examples.")
  return pairs


def generate_problems(seed: int, n: int) -> list[Pair]:
  """Arithmetic word problems in GSM8K's format, for machines without the data set."""
  rng = np.random.default_rng(seed)
  names, items = ["Ann", "Ben", "Carla", "Dev", "Eli", "Fay"], ["apples", "books", "coins", "pens", "shells"]
  pairs = []
  for _ in range(n):
    name, item = rng.choice(names), rng.choice(items)
    a, b = int(rng.integers(2, 20)), int(rng.integers(1, 10))
    if rng.random() < 0.5:
      q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
      ans = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"
    else:
      a = a + b
      q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
      ans = f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left.\n#### {a - b}"
    pairs.append((q, ans))
  return pairs


def get_data(data_dir: str | None, *, allow_network: bool, seed: int) -> tuple[list[Pair], list[Pair], str]:
  if data_dir:
    d = Path(data_dir)
    return load_jsonl(d / "train.jsonl"), load_jsonl(d / "test.jsonl"), f"jsonl:{d}"
  if allow_network:
    try:
      from datasets import load_dataset
      ds = load_dataset("openai/gsm8k", "main")
      as_pairs = lambda split: [(r["question"], r["answer"]) for r in ds[split]]
      return as_pairs("train"), as_pairs("test"), "hf:openai/gsm8k"
    except Exception as e:  # no package, no network: fall through to generated data
      print(f"HF datasets unavailable ({type(e).__name__}); using generated problems.")
  return generate_problems(seed, 2000), generate_problems(seed + 1, 200), f"generated:seed={seed}"


def default_data_dir() -> str | None:
  if os.environ.get("MOS_DATA_DIR"):
    return os.path.join(os.environ["MOS_DATA_DIR"], "gsm8k")
  return str(SHARED_GSM8K) if SHARED_GSM8K.is_dir() else None


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
  """A byte-level BPE tokenizer trained on ``texts`` with the `tokenizers` library."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(tokenizer: Any, *, layers: int = 4, hidden: int = 128, logit_scale: float = 3.0,
               seed: int = 0) -> Any:
  """A small random Llama whose weights are scaled like a trained network's.

  HF's default init (std 0.02 everywhere) leaves a tiny model's activations near zero,
  so a frozen base passes almost no signal through the adapted projections; std
  1/sqrt(hidden) keeps activations O(1), as pretrained weights do. ``lm_head`` is scaled
  by ``logit_scale`` so that logits spread over a few nats like a pretrained LM's: with
  a unit-scale frozen head no adapter below it can make a prediction confident (the
  loss floors near 0.2 nats/token on memorisation tasks while a full fine-tune, which
  trains the head, does not).
  """
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                    initializer_range=hidden ** -0.5,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  with jax.numpy_rank_promotion("allow"):
    model = FlaxLlamaForCausalLM(cfg, seed=seed)
  params = dict(model.params)
  params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * logit_scale}
  model.params = params
  return model


def load_pretrained(name_or_path: str, *, allow_network: bool, dtype: Any) -> tuple[Any, Any]:
  """A Flax Llama and its tokenizer from a local HF folder (PyTorch safetensors are fine) or the hub."""
  from transformers import AutoTokenizer
  model = load_causal_lm(name_or_path, allow_network=allow_network, dtype=dtype)
  tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=Path(name_or_path).is_dir())
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return model, tokenizer


def evaluate_generation(model: Any, params: Any, tokenizer: Any, pairs: Sequence[Pair], *,
                        adapter: mos_jax.Adapter | None, pools: Any = None, batch_size: int = 32,
                        max_new_tokens: int = 96) -> tuple[float, list[str]]:
  """Greedy answers for ``pairs``' questions and their exact-match accuracy."""
  predictions = []
  for i in range(0, len(pairs), batch_size):
    chunk = pairs[i:i + batch_size]
    ids, mask = left_pad_prompts(tokenizer, [q for q, _ in chunk])
    out = mos_jax.generate(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                           pools=pools, routing=adapter.routing if adapter else None,
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="tiny", help="'tiny', a local HF folder, or a hub name")
  parser.add_argument("--data-dir", default=default_data_dir())
  parser.add_argument("--allow-network", action="store_true")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--equivalent-rank", type=int, default=2)
  parser.add_argument("--private-rank", type=int, default=0)
  parser.add_argument("--shards-per-vector", type=int, default=2)
  parser.add_argument("--train-limit", type=int, default=None, help="use the first N training problems")
  parser.add_argument("--eval-limit", type=int, default=100, help="evaluate on the first N test problems")
  parser.add_argument("--max-new-tokens", type=int, default=96)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/gsm8k")
  args = parser.parse_args()
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
                                              pools=result["trainable_state"], max_new_tokens=args.max_new_tokens)
  Path(args.out, "predictions.jsonl").write_text("".join(
      json.dumps({"question": q, "reference": a, "prediction": p}) + "\n"
      for (q, a), p in zip(test_pairs, predictions)))
  print(f"\nGSM8K exact match on {len(test_pairs)} test problems: {accuracy:.3f}")
  print(f"example: Q: {test_pairs[0][0]}\n  predicted: {predictions[0]!r}\n  reference: {final_number(test_pairs[0][1])}")
  print(f"outputs in {args.out} (metrics.jsonl, curves.png, adapter.safetensors, predictions.jsonl); "
        f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  main()
