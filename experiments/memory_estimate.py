"""Memory estimate: MoS versus LoRA for a real model's shapes, allocating no weights.

Prints trainable parameters, optimizer state, adapter file size and adapters per
GiB for MoS, LoRA at the same active rank and LoRA at MoS's equivalent rank, on
the model's shapes alone (jax.eval_shape: LLaMA2-13B takes about a second).

Run:
  .venv/bin/python -m experiments.memory_estimate --preset llama2-7b
  .venv/bin/python -m experiments.memory_estimate --preset llama3.2-3b --rank 16 --equivalent-rank 2
  .venv/bin/python -m experiments.memory_estimate --hf-config /path/to/model/config.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import transformers  # noqa: E402
from transformers.models.auto import modeling_flax_auto  # noqa: E402

from mos_jax.core import LLAMA_TARGETS, MemoryEstimate, MoSConfig, estimate_memory  # noqa: E402
from mos_jax.hf import param_shapes  # noqa: E402

#: Published hyper-parameters (the models' config.json files on the HF hub).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=True),
    # Eight layers so that the default MoS (r=8, r_e=1, l=2) fits its public region.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=False),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf-config", help="config.json of a local HF model (or its folder)")
  source.add_argument("--preset", choices=sorted(PRESETS), help="built-in LLaMA-family shapes")
  p.add_argument("--rank", type=int, default=8, help="MoS active rank r (default 8)")
  p.add_argument("--equivalent-rank", type=int, default=1, help="MoS budget r_e (default 1)")
  p.add_argument("--private-rank", type=int, default=0, help="MoS private rank r_p (default 0)")
  p.add_argument("--shards-per-vector", type=int, default=2, help="MoS shards per vector l (default 2)")
  p.add_argument("--seed", type=int, default=0, help="MoS routing seed (default 0)")
  p.add_argument("--lora-rank", type=int, default=None, help="LoRA baseline rank (default: --rank)")
  p.add_argument("--targets", nargs="+", default=list(LLAMA_TARGETS),
                 help="module names or path suffixes to adapt, space or comma separated "
                      "(default: the seven LLaMA projections)")
  p.add_argument("--adapter-dtype", default="float32", help="stored/served adapter dtype")
  p.add_argument("--state-dtype", default="float32", help="optimizer moment dtype")
  p.add_argument("--base-dtype", default="bfloat16", help="frozen base dtype ('nf4' for QLoRA)")
  p.add_argument("--serving-gib", type=float, default=1.0, help="serving budget for adapters, GiB")
  p.add_argument("--no-routing", action="store_true",
                 help="leave MoS's routing indices out of its file size (regenerated from the seed)")
  p.add_argument("--json", dest="json_out", default=None, help="also write the estimate as JSON here")
  return p.parse_args(argv)


def load_hf_config(args: argparse.Namespace) -> Any:
  """The HF config of ``--preset`` or ``--hf-config``."""
  if args.preset:
    return transformers.LlamaConfig(**PRESETS[args.preset])
  return transformers.AutoConfig.from_pretrained(args.hf_config)


def flax_model_class(hf_config: Any) -> type:
  """The HF Flax causal-LM class for ``hf_config``, else its bare Flax model class."""
  for mapping in (modeling_flax_auto.FLAX_MODEL_FOR_CAUSAL_LM_MAPPING,
                  modeling_flax_auto.FLAX_MODEL_MAPPING):
    if type(hf_config) in mapping:
      return mapping[type(hf_config)]
  raise SystemExit(f"transformers has no Flax model for {type(hf_config).__name__} "
                   f"(model_type={getattr(hf_config, 'model_type', None)!r}).")


def untied_head_params(shapes: Any, hf_config: Any) -> int:
  """Parameters of an ``lm_head`` that HF Flax keeps although the config ties it.

  HF's Flax Llama always creates a separate ``lm_head``, so for tied models
  (LLaMA 3.2) its base is larger than the published checkpoint by this much.
  """
  head = shapes.get("lm_head", {}).get("kernel") if hasattr(shapes, "get") else None
  if head is None or not getattr(hf_config, "tie_word_embeddings", False):
    return 0
  return int(head.shape[0] * head.shape[1])


def mos_config(args: argparse.Namespace) -> MoSConfig:
  targets = tuple(t for arg in args.targets for t in arg.split(",") if t)
  return MoSConfig(rank=args.rank, equivalent_rank=args.equivalent_rank,
                   private_rank=args.private_rank, shards_per_vector=args.shards_per_vector,
                   seed=args.seed, target_modules=targets)


def main(argv: Sequence[str] | None = None) -> MemoryEstimate:
  args = parse_args(argv)
  hf_config = load_hf_config(args)
  model_cls = flax_model_class(hf_config)
  shapes = param_shapes(model_cls, hf_config)
  try:
    estimate = estimate_memory(
        shapes, mos_config(args), lora_rank=args.lora_rank, state_dtype=args.state_dtype,
        adapter_dtype=args.adapter_dtype, base_dtype=args.base_dtype,
        count_routing=not args.no_routing, serving_budget_gib=args.serving_gib)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  source = f"preset {args.preset}" if args.preset else args.hf_config
  print(f"model: {source} ({model_cls.__name__})")
  print(estimate.format())
  extra = untied_head_params(shapes, hf_config)
  if extra:
    print(f"- The config ties word embeddings but HF Flax {model_cls.__name__} keeps a separate "
          f"lm_head: the base above includes {extra:,} params the tied checkpoint does not have.")
  if args.json_out:
    record = {"model": source, "model_class": model_cls.__name__, "untied_head_params": extra,
              "mos_config": {"rank": args.rank, "equivalent_rank": args.equivalent_rank,
                             "private_rank": args.private_rank,
                             "shards_per_vector": args.shards_per_vector, "seed": args.seed,
                             "target_modules": list(mos_config(args).target_modules)},
              **estimate.to_dict()}
    with open(args.json_out, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {args.json_out}")
  return estimate


if __name__ == "__main__":
  main(sys.argv[1:])
