"""Tiny Hugging Face model folders for the training entry point's tests.

`gemma3_folder` writes a random Gemma 3 (6 layers: five sliding-window ones and a global one, as Gemma 3
alternates them) in bfloat16 the way `save_pretrained` lays it out, split into several safetensors shards with
an index, next to a BPE tokenizer whose special tokens and chat template are Gemma's. It needs no PyTorch (the
default suite runs without it); the slow suite checks it against transformers' PyTorch model.
`decoder_folder` (Llama 3, Qwen 3; slow suite only) is saved by transformers' PyTorch models themselves. The
code under test never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SAMPLE_TEXT = [
    "the quick brown fox jumps over the lazy dog", "what is two plus two? four.", "name a colour: blue",
    "translate to french: cat -> chat", "user model answer question please thanks", "one two three four five six",
    "is the sentiment positive or negative? positive", "capital of france is paris", "sum of 3 and 4 is 7",
]


def gemma3_tokenizer(folder: Path) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  from experiments.lib.nnx_models import GEMMA_TEMPLATE

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SAMPLE_TEXT * 4, trainers.BpeTrainer(
      vocab_size=400, special_tokens=GEMMA_SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
  fast.chat_template = GEMMA_TEMPLATE
  fast.save_pretrained(folder)


GEMMA3_LAYER = (("self_attn.q_proj", ("q", "h")), ("self_attn.k_proj", ("kv", "h")), ("self_attn.v_proj", ("kv", "h")),
                ("self_attn.o_proj", ("h", "q")), ("self_attn.q_norm", ("d",)), ("self_attn.k_norm", ("d",)),
                ("mlp.gate_proj", ("f", "h")), ("mlp.up_proj", ("f", "h")), ("mlp.down_proj", ("h", "f")),
                ("input_layernorm", ("h",)), ("post_attention_layernorm", ("h",)),
                ("pre_feedforward_layernorm", ("h",)), ("post_feedforward_layernorm", ("h",)))


def gemma3_folder(folder: Path, *, seed: int = 0, layers: int = 6, shard_size: int = 150_000) -> Path:
  """A tiny Gemma 3 in HF layout: bf16 safetensors in 2+ shards with an index, config and tokenizer.

  Written without PyTorch (the default suite's machine has none), tensor for tensor as transformers'
  ``Gemma3ForCausalLM.save_pretrained(max_shard_size="150KB")`` writes it: the same names, shapes, order,
  shards and index. The slow suite loads it into transformers' PyTorch model (no key missing or unexpected) and
  compares logits, so a layout that drifted from Hugging Face's would fail there.
  """
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  from transformers import Gemma3TextConfig, GenerationConfig

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  gemma3_tokenizer(folder)
  vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
  vocab = max(vocab, 400)
  cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=8, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=True, architectures=["Gemma3ForCausalLM"])
  (folder / "config.json").write_text(json.dumps({**cfg.to_diff_dict(), "dtype": "bfloat16"}, indent=2,
                                                 sort_keys=True) + "\n")
  GenerationConfig.from_model_config(cfg).save_pretrained(folder)
  sizes = {"h": cfg.hidden_size, "f": cfg.intermediate_size, "d": cfg.head_dim,
           "q": cfg.num_attention_heads * cfg.head_dim, "kv": cfg.num_key_value_heads * cfg.head_dim}
  shapes = {"model.embed_tokens.weight": (vocab, cfg.hidden_size)}
  for i in range(layers):
    shapes.update({f"model.layers.{i}.{name}.weight": tuple(sizes[a] for a in axes) for name, axes in GEMMA3_LAYER})
  shapes["model.norm.weight"] = (cfg.hidden_size,)
  rng = np.random.default_rng(seed)
  # Norms well away from 0 and unit-variance rows: the tiny model's activations carry signal (HF's own
  # initialisation leaves norms at 0 and weights tiny).
  tensors = {name: (rng.standard_normal(shape) * (0.3 if "norm" in name else cfg.hidden_size ** -0.5))
             .astype(ml_dtypes.bfloat16) for name, shape in shapes.items()}
  shards, size = [[]], 0  # transformers' greedy split: a new shard when the next tensor would overflow this one
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > shard_size:
      shards, size = shards + [[]], 0
    shards[-1].append(name)
    size += t.nbytes
  weight_map = {}
  for k, names in enumerate(shards, 1):
    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(names, file))
  index = {"metadata": {"total_parameters": sum(t.size for t in tensors.values()),
                        "total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  assert len(shards) > 1, "the fixture exists to exercise a sharded checkpoint: lower shard_size"
  return folder


def instruction_file(path: Path, n: int = 48, *, seed: int = 0) -> Path:
  """A JSONL instruction set: prompt/response rows and chat rows, deterministic."""
  import random

  rng = random.Random(seed)
  rows = []
  for i in range(n):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if i % 3 == 2:
      rows.append({"messages": [{"role": "user", "content": f"sum of {a} and {b}"},
                                {"role": "assistant", "content": f"{a + b}"},
                                {"role": "user", "content": "and times two?"},
                                {"role": "assistant", "content": f"{2 * (a + b)}"}]})
    else:
      rows.append({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}."})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def decoder_folder(folder: Path, family: str, *, seed: int = 0, rope_scaling: dict | None = None,
                   shard_size: str = "150KB") -> Path:
  """A tiny Llama 3 (GQA, rope_theta 500,000, optional Llama 3.1 scaling) or Qwen 3 (rope_theta 5,000,000, q/k
  norms, tied head) in HF layout, sharded safetensors."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
  if family == "llama3":
    cfg = LlamaConfig(rope_theta=500_000.0, rope_scaling=rope_scaling, tie_word_embeddings=False, **common)
    model_cls = LlamaForCausalLM
  else:
    cfg = Qwen3Config(rope_theta=5_000_000.0, head_dim=16, tie_word_embeddings=True, **common)
    model_cls = Qwen3ForCausalLM
  torch.manual_seed(seed)
  model = model_cls(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 + 1.0 if "norm" in name else 64 ** -0.5))
  model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
  return folder
