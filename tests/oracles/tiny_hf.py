"""Tiny Hugging Face model folders for the training entry point's tests, written by transformers itself.

`gemma3_folder` saves a randomly initialised `Gemma3ForCausalLM` (6 layers: five sliding-window ones and a
global one, as Gemma 3 alternates them) with `save_pretrained` in bfloat16, split into several safetensors
shards with an index, next to a BPE tokenizer whose special tokens and chat template are Gemma's. PyTorch
and transformers are used here only to write the fixture, as the hub's files are written; the code under
test never imports torch.
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


def gemma3_folder(folder: Path, *, seed: int = 0, layers: int = 6, shard_size: str = "150KB") -> Path:
  """A tiny Gemma 3 in HF layout: bf16 safetensors in 2+ shards with an index, config and tokenizer."""
  import torch
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  gemma3_tokenizer(folder)
  vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
  vocab = max(vocab, 400)
  cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=8, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=True)
  torch.manual_seed(seed)
  model = Gemma3ForCausalLM(cfg)
  with torch.no_grad():  # HF's init leaves norms at 0 and tiny weights: give the tiny model signal to carry
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 64 ** -0.5))
  model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
  assert (folder / "model.safetensors.index.json").is_file(), sorted(p.name for p in folder.iterdir())
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
