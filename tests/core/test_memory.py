"""Memory estimates against numbers computed by hand for real model shapes."""

import json
import subprocess
import sys

import jax
import pytest
from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig

from experiments import memory_estimate
from mos_jax import MoSConfig, adapt
from mos_jax.core import estimate_memory
from mos_jax.hf import param_shapes
from oracles.helpers import REPO_ROOT

GIB = 2**30

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
LLAMA32_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama2_7b():
  return param_shapes(FlaxLlamaForCausalLM, LlamaConfig(**LLAMA2_7B))


@pytest.fixture(scope="module")
def llama32_3b():
  return param_shapes(FlaxLlamaForCausalLM, LlamaConfig(**LLAMA32_3B))


def test_param_shapes_are_abstract_and_complete(llama2_7b):
  leaves = jax.tree_util.tree_leaves(llama2_7b)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert llama2_7b["model"]["layers"]["31"]["mlp"]["down_proj"]["kernel"].shape == (11008, 4096)
  embed = 32000 * 4096  # embed_tokens, and lm_head again (LLaMA2 does not tie)
  layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two RMSNorms
  assert sum(x.size for x in leaves) == 2 * embed + 32 * layer + 4096 == 6_738_415_616


def test_llama2_7b_all_projections_by_hand(llama2_7b):
  # Spec §7: per layer q, k, v, o each 4096+4096; gate, up 4096+11008; down 11008+4096.
  per_layer = 4 * (4096 + 4096) + 3 * (4096 + 11008)
  assert per_layer == 78_080
  per_rank = 32 * per_layer
  assert per_rank == 2_498_560

  est = estimate_memory(llama2_7b, MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2))
  assert est.lora.trainable_params == 8 * per_rank == 19_988_480
  assert est.lora.optimizer_state_bytes == 2 * 4 * 19_988_480
  assert est.lora.file_bytes == 4 * 19_988_480 and est.lora.routing_entries == 0
  assert est.mos.trainable_params == est.lora_equivalent.trainable_params == per_rank
  assert est.lora.trainable_params == 8 * est.mos.trainable_params
  assert est.mos.optimizer_state_bytes == 2 * 4 * per_rank
  routing = 2 * 7 * 32 * 8 * 2  # A and B, 7 types, L=32, r=8, l=2
  assert est.mos.routing_entries == routing == 7168
  assert est.mos.file_bytes == 4 * per_rank + 4 * routing == 10_022_912
  assert est.base_params == 6_738_415_616 and est.base_bytes == 2 * 6_738_415_616
  assert (est.num_module_types, est.num_modules) == (7, 7 * 32)
  assert est.mos.adapters_per_budget == GIB // 10_022_912 == 107
  assert est.lora.adapters_per_budget == GIB // (4 * 19_988_480) == 13
  assert est.ratios()["lora"]["trainable"] == 8.0
  assert est.ratios()["lora_equivalent"]["file"] < 1  # same weights, plus the routing

  table = str(est)
  for text in ("MoS r=8 r_e=1 l=2", "LoRA r=8", "LoRA r=1", "19,988,480", "2,498,560",
               "8.00x less", "adapters in 1 GiB", "7,168"):
    assert text in table


def test_options_change_only_what_they_name(llama2_7b):
  cfg = MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2)
  est = estimate_memory(llama2_7b, cfg, lora_rank=16, optimizer_moments=1, state_dtype="bfloat16",
                        adapter_dtype="bfloat16", base_dtype="nf4", count_routing=False,
                        serving_budget_gib=0.5)
  assert est.lora.trainable_params == 16 * 2_498_560 and est.lora.label == "LoRA r=16"
  assert est.mos.optimizer_state_bytes == 1 * 2 * 2_498_560
  assert est.mos.file_bytes == est.mos.weight_bytes == 2 * 2_498_560
  assert est.mos.routing_entries == 7168  # still reported, just not in the file
  assert est.base_bytes == 6_738_415_616 // 2
  assert est.mos.adapters_per_budget == (GIB // 2) // (2 * 2_498_560)
  assert "routing not counted" in est.format()


def test_gqa_llama32_3b_by_hand(llama32_3b):
  # head_dim 3072/24 = 128, 8 kv heads: k_proj and v_proj map 3072 -> 1024.
  per_layer = 2 * (3072 + 3072) + 2 * (3072 + 1024) + 3 * (3072 + 8192)
  assert per_layer == 54_272
  per_rank = 28 * per_layer
  cfg = MoSConfig(rank=16, equivalent_rank=2, private_rank=1, shards_per_vector=4)
  est = estimate_memory(llama32_3b, cfg)
  assert est.mos.trainable_params == est.lora_equivalent.trainable_params == 2 * per_rank == 3_039_232
  assert est.lora.trainable_params == 16 * per_rank
  assert est.mos.routing_entries == 2 * 7 * 28 * 16 * 4
  assert est.mos.label == "MoS r=16 r_e=2 r_p=1 l=4"
  # HF Flax Llama ignores tie_word_embeddings: a separate lm_head is in the base.
  embed = 128256 * 3072
  layer = 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072
  assert est.base_params == 2 * embed + 28 * layer + 3072 == 3_606_752_256


def test_invalid_config_raises_what_adapt_raises(tiny_llama):
  cfg = MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2)  # draws 16 > 4·1·2 public shards
  with pytest.raises(ValueError, match="public region holds only") as from_adapt:
    adapt(tiny_llama.params, cfg)
  with pytest.raises(ValueError) as from_estimate:
    estimate_memory(param_shapes(FlaxLlamaForCausalLM, tiny_llama.config), cfg)
  assert str(from_estimate.value) == str(from_adapt.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=8, equivalent_rank=1, shards_per_vector=3), "not divisible by shards_per_vector"),
    (dict(rank=40, equivalent_rank=1), "public region holds only"),
    (dict(rank=8, equivalent_rank=1, target_modules=("qkv",)), "No module matched"),
])
def test_config_that_does_not_fit_the_model_fails(llama2_7b, kwargs, message):
  with pytest.raises(ValueError, match=message):
    estimate_memory(llama2_7b, MoSConfig(**kwargs))


def test_option_validation_and_dtype_bits(llama2_7b):
  cfg = MoSConfig(rank=8, equivalent_rank=1)
  with pytest.raises(ValueError, match="lora_rank"):
    estimate_memory(llama2_7b, cfg, lora_rank=0)
  with pytest.raises(ValueError, match="Unknown dtype"):
    estimate_memory(llama2_7b, cfg, base_dtype="float7")
  # The base's bytes count each dtype's bits (nf4: 4, constants excluded).
  n = estimate_memory(llama2_7b, cfg).base_params
  bits = [8 * estimate_memory(llama2_7b, cfg, base_dtype=d).base_bytes / n
          for d in ("float32", "bfloat16", "int8", "nf4")]
  assert bits == [32, 16, 8, 4]


def test_long_context_is_trimmed_only_when_positions_own_no_params():
  llama = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1)
  long_cfg = LlamaConfig(**llama, max_position_embeddings=131072)
  short = jax.tree_util.tree_map(lambda x: x.shape, param_shapes(
      FlaxLlamaForCausalLM, LlamaConfig(**llama, max_position_embeddings=64)))
  assert jax.tree_util.tree_map(lambda x: x.shape, param_shapes(FlaxLlamaForCausalLM, long_cfg)) == short
  assert long_cfg.max_position_embeddings == 131072  # the caller's config is untouched
  # GPT-2 learns a position table: its shape must follow the real context length.
  gpt2 = param_shapes(FlaxGPT2LMHeadModel, GPT2Config(n_positions=16384, n_embd=32, n_layer=1, n_head=2))
  assert gpt2["transformer"]["wpe"]["embedding"].shape == (16384, 32)


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.memory_estimate", *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_cli_preset_tiny_writes_json(tmp_path):
  out = tmp_path / "memory.json"
  done = _run_cli("--preset", "tiny", "--json", str(out))
  assert done.returncode == 0, done.stderr
  assert "MoS r=8 r_e=1 l=2" in done.stdout and "adapters in 1 GiB" in done.stdout
  record = json.loads(out.read_text())
  # tiny: hidden 64, intermediate 128, head_dim 16 with 2 kv heads (k/v out 32), 8 layers.
  per_rank = 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
  assert record["mos"]["trainable_params"] == per_rank == 8192
  assert record["lora"]["trainable_params"] == 8 * per_rank
  assert record["mos"]["routing_entries"] == 2 * 7 * 8 * 8 * 2
  assert record["ratios"]["lora"]["trainable"] == 8.0
  assert record["mos_config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"]


def test_cli_reads_a_local_hf_config_and_reports_bad_configs(tmp_path, capsys):
  assert memory_estimate.PRESETS["llama2-7b"] | LLAMA2_7B == memory_estimate.PRESETS["llama2-7b"]
  assert memory_estimate.PRESETS["llama3.2-3b"] | LLAMA32_3B == memory_estimate.PRESETS["llama3.2-3b"]
  LlamaConfig(**memory_estimate.PRESETS["tiny"]).save_pretrained(tmp_path)
  est = memory_estimate.main(["--hf-config", str(tmp_path / "config.json"), "--targets", "q_proj,v_proj",
                              "--rank", "4", "--shards-per-vector", "1"])
  assert est.mos.trainable_params == 8 * ((64 + 64) + (64 + 32))
  assert "LoRA r=4" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="public region holds only"):
    memory_estimate.main(["--preset", "tiny", "--rank", "40"])
