"""The models the experiments run on: random and tiny HF Flax Llamas, a BPE tokenizer, HF checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp


def random_llama(*, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 max_positions: int, seed: int = 0, dtype: Any = jnp.float32, **config: Any) -> Any:
  """A randomly initialised HF ``FlaxLlamaForCausalLM``; ``dtype`` is its compute dtype.

  ``config`` adds other ``LlamaConfig`` fields (``initializer_range``, token ids, ...).
  """
  from transformers import FlaxLlamaForCausalLM, LlamaConfig  # slow import: only when a model is built
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                    **config)
  # HF's Llama init broadcasts implicitly; allow it even under a strict global setting.
  with jax.numpy_rank_promotion("allow"):
    return FlaxLlamaForCausalLM(cfg, seed=seed, dtype=dtype)


def tiny_llama(tokenizer: Any, *, layers: int = 4, hidden: int = 128, logit_scale: float = 3.0,
               seed: int = 0) -> Any:
  """A small random Llama for ``tokenizer`` whose weights are scaled like a trained network's.

  HF's default init (std 0.02 everywhere) leaves a tiny model's activations near zero,
  so a frozen base passes almost no signal through the adapted projections; std
  1/sqrt(hidden) keeps activations O(1), as pretrained weights do. ``lm_head`` is scaled
  by ``logit_scale`` so that logits spread over a few nats like a pretrained LM's: with
  a unit-scale frozen head no adapter below it can make a prediction confident (the
  loss floors near 0.2 nats/token on memorisation tasks while a full fine-tune, which
  trains the head, does not).
  """
  model = random_llama(vocab=len(tokenizer), hidden=hidden, intermediate=2 * hidden, layers=layers, heads=4,
                       kv_heads=2, max_positions=512, seed=seed, initializer_range=hidden ** -0.5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
  params = dict(model.params)
  params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * logit_scale}
  model.params = params
  return model


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
  """A byte-level BPE tokenizer (``<pad>``, ``<s>`` prepended, ``</s>``) trained on ``texts``."""
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


def load_causal_lm(name_or_path: str, *, allow_network: bool, dtype: Any) -> Any:
  """A Flax Llama from a local HF folder (Flax msgpack or PyTorch safetensors) or, with network, the hub."""
  from transformers import FlaxLlamaForCausalLM
  local = Path(name_or_path).is_dir()
  if not local and not allow_network:
    raise FileNotFoundError(f"{name_or_path!r} is not a local folder; allow network access to load it "
                            "from the hub.")
  has_flax = local and (Path(name_or_path) / "flax_model.msgpack").exists()
  with jax.numpy_rank_promotion("allow"):
    return FlaxLlamaForCausalLM.from_pretrained(name_or_path, from_pt=not has_flax, dtype=dtype,
                                                local_files_only=local)


def random_gemma3(*, vocab: int, embed: int, hidden: int, layers: int, heads: int, head_dim: int, kv_heads: int,
                  sliding_window: int, seed: int = 0, dtype: Any = jnp.float32) -> Any:
  """A Tunix NNX Gemma 3 of the given sizes, every weight drawn from ``N(0, 1/embed)`` (seed ``seed``).

  Tunix initialises some kernels to zero; random weights make every layer (and adapter) matter.
  """
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from tunix.models.gemma3 import model as g3  # noqa: PLC0415 - Tunix is an optional extra

  cfg = g3.ModelConfig(num_layers=layers, num_embed=vocab, embed_dim=embed, hidden_dim=hidden, num_heads=heads,
                       head_dim=head_dim, num_kv_heads=kv_heads, sliding_window_size=sliding_window, param_dtype=dtype)
  model = g3.Gemma3(cfg, rngs=nnx.Rngs(seed))
  leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(embed ** -0.5 * rng.standard_normal(x.shape), x.dtype) for x in leaves]))
  return model
