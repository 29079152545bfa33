"""PyTorch reference: HF PEFT LoRA against the frozen model, on bench_core's shapes (optional, not CI).

The same HF Llama as ``experiments.bench_core`` (random init, untied embeddings, float32, all
seven projections, rank 8, alpha 16, AdamW), built with ``transformers``' PyTorch classes, timed
on the CPU round-robin in one process:

  frozen fwd+bwd   forward + next-token cross-entropy, backward to a scalar added (by a forward
                   hook) to each of layer 0's q/k/v outputs, nothing else requiring a gradient:
                   the full activation backward an adapter step needs, no weight gradients,
                   no gradient of layer 0's input (bench_core's floor).
  PEFT LoRA step   ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, ...))``, forward,
                   backward, ``torch.optim.AdamW`` step and ``zero_grad``.

Reports medians and the median per-round ratio LoRA / frozen with its 95% bootstrap interval, per
size, and the load average before and after, in experiments/results/bench_peft_torch.json
(--out), so the docs can put PyTorch's ratio beside JAX's. Needs ``torch`` and ``peft``
(``make bench-torch`` installs the CPU builds).

  .venv/bin/python -m experiments.bench_peft_torch --threads 1   # both sizes, ~2 minutes
  .venv/bin/python -m experiments.bench_peft_torch --hidden 256 --repeats 5

Use ``--threads 1`` on a shared machine (one core by taskset, ``torch.set_num_threads(1)``):
PyTorch's two-thread OpenMP pool stalls whenever another process holds a core (steps 5-10x
slower), while one thread gives the quiet machine's ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable

import numpy as np

from experiments.lib import bench

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, nargs="+", default=sorted(bench.CORE_PRESETS),
                   choices=sorted(bench.CORE_PRESETS), help="model sizes (default: 256 1024)")

  return bench.bench_parser(__doc__, out_file="bench_peft_torch.json", quick_help="tiny model, 2 repeats",
                            repeats_help="timed calls per variant (default 20 at hidden 256, 10 at 1024)",
                            extra=extra).parse_args()


def build(s: bench.CoreSizes) -> Any:
  """bench_core's Llama in PyTorch: same config, random init (seed 0), untied embeddings, float32."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                    num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                    max_position_embeddings=max(s.seq, 128), tie_word_embeddings=False)
  return LlamaForCausalLM(cfg).float()


def loss_of(model: Any, ids: Any) -> Any:
  """Mean next-token cross-entropy (HF shifts the labels itself)."""
  return model(input_ids=ids, labels=ids).loss


def frozen_step(s: bench.CoreSizes, ids: Any) -> Callable[[], float]:
  """bench_core's floor: the backward to scalars added to layer 0's q/k/v outputs, no parameter gradients."""
  import torch

  model = build(s)
  for p in model.parameters():
    p.requires_grad_(False)
  attn = model.model.layers[0].self_attn
  deltas = [torch.zeros((), requires_grad=True) for _ in range(3)]
  for proj, delta in zip((attn.q_proj, attn.k_proj, attn.v_proj), deltas):
    proj.register_forward_hook(lambda module, args, out, delta=delta: out + delta)

  def step() -> float:
    loss = loss_of(model, ids)
    loss.backward()
    for d in deltas:
      d.grad = None
    return float(loss.detach())

  return step


def lora_step(s: bench.CoreSizes, ids: Any) -> tuple[Callable[[], float], int]:
  import torch
  from peft import LoraConfig, get_peft_model

  model = get_peft_model(build(s), LoraConfig(r=s.rank, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-3)

  def step() -> float:
    loss = loss_of(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def run_size(s: bench.CoreSizes) -> dict[str, Any]:
  import torch

  ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(1))
  frozen = frozen_step(s, ids)
  lora, trainable = lora_step(s, ids)
  calls = {"frozen fwd+bwd": frozen, "PEFT LoRA step": lora}
  for _ in range(2):  # warm-up: allocations, oneDNN primitive caches, AdamW state
    for fn in calls.values():
      fn()
  times: dict[str, list[float]] = {k: [] for k in calls}
  for i in range(s.repeats):
    for name in (list(calls) if i % 2 == 0 else list(reversed(calls))):
      t0 = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - t0)
  f, lo = np.asarray(times["frozen fwd+bwd"]), np.asarray(times["PEFT LoRA step"])
  out = {"sizes": dataclasses.asdict(s), "trainable_params": trainable,
         "frozen_fwd_bwd_ms": float(np.median(f) * 1e3), "lora_step_ms": float(np.median(lo) * 1e3),
         "lora_over_frozen": bench.paired_ratio(lo, f),
         "lora_overhead_ms": float(np.median(lo - f) * 1e3),
         "times_ms": {k: [float(x * 1e3) for x in v] for k, v in times.items()}}
  print(f"hidden {s.hidden}: frozen fwd+bwd {out['frozen_fwd_bwd_ms']:.1f} ms, PEFT LoRA step "
        f"{out['lora_step_ms']:.1f} ms, ratio (paired) {bench.fmt_ratio(out['lora_over_frozen'])}, "
        f"overhead {out['lora_overhead_ms']:.1f} ms", flush=True)
  return out


def main() -> None:
  args = parse_args()
  run = bench.run_info(args)
  try:
    import peft
    import torch
  except ImportError as e:
    raise SystemExit(f"{e}: this benchmark needs PyTorch and PEFT; run `make bench-torch`, which installs "
                     "torch==2.13.0 peft==0.21.2 (CPU).") from e
  if args.threads:
    torch.set_num_threads(args.threads)
  sizes = [bench.CORE_QUICK] if args.quick else [bench.CORE_PRESETS[h] for h in args.hidden]
  runs = {}
  with torch.inference_mode(False):
    for s in sizes:
      s = dataclasses.replace(s, repeats=args.repeats or (2 if args.quick else 20 if s.hidden <= 256 else 10))
      runs[str(s.hidden)] = run_size(s)
  env = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
         **{k: v for k, v in bench.environment().items() if k in ("python", "cpu_count")}}
  bench.write_json(args.out, {"quick": args.quick, "environment": env, "runs": runs}, run)


if __name__ == "__main__":
  main()
