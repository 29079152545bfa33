"""Merged HF Flax export (W + ΔW): loads with from_pretrained and reproduces the injected model."""

import jax
import numpy as np
import pytest
from transformers import FlaxLlamaForCausalLM

import mos_jax.hf
from mos_jax import MismatchError, merge
from oracles.helpers import EXPORT_CONFIG, TOKEN_IDS, assert_close, hf_numerics, injected_logits, trained_adapter


@pytest.fixture(scope="module")
def trained(tiny_llama):
  return trained_adapter(tiny_llama.params, EXPORT_CONFIG)


def test_merged_export_loads_with_from_pretrained(tiny_llama, trained, tmp_path):
  folder = mos_jax.hf.export_merged(tmp_path / "merged", tiny_llama, tiny_llama.params, trained)
  assert (folder / "model.safetensors").exists() and not (folder / "flax_model.msgpack").exists()
  with hf_numerics():
    reloaded = FlaxLlamaForCausalLM.from_pretrained(folder)
  merged = merge(tiny_llama.params, trained)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, merged)
  with hf_numerics():
    logits = np.asarray(reloaded(TOKEN_IDS).logits)
    base = np.asarray(tiny_llama(TOKEN_IDS).logits)
  injected = injected_logits(tiny_llama, tiny_llama.params, trained)
  assert np.abs(injected - base).max() > 1e-2  # the adapter changes the output...
  # ...and merged weights reproduce it up to float32 rounding of W + ΔW vs. W x + ΔW x.
  assert_close(logits, injected, rtol=1e-5)


def test_merged_export_refuses_params_of_another_model(tiny_llama, trained, tmp_path):
  """Issue 13.7: a hidden-64 model with hidden-32 params wrote a folder that then failed to load."""
  from transformers import LlamaConfig
  with hf_numerics():
    wide = FlaxLlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False), _do_init=False)
  with pytest.raises(MismatchError, match=r"params are not the model's") as err:
    mos_jax.hf.export_merged(tmp_path / "merged", wide, tiny_llama.params, trained)
  assert "embed_tokens/embedding]: the model's config has [64, 64], the params tree has [64, 32]" in str(err.value)
  assert "Pass the model whose params these are" in str(err.value)
  assert list(tmp_path.iterdir()) == []  # nothing written


