"""Native MoS adapter files, PEFT LoRA export, merged HF Flax export (and PEFT in PyTorch, slow)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import FlaxLlamaForCausalLM

from conftest import hf_numerics
from helpers import random_pools
import mos_jax.hf
from mos_jax import MoSConfig, adapt, export_peft, inject, load_adapter, merge, save_adapter
from mos_jax.core import CorruptError, MismatchError, delta_weight, layer_factors
from mos_jax.formats import load_peft_factors

MOS = MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, alpha=8.0)
IDS = np.random.default_rng(0).integers(0, 64, size=(2, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def trained(tiny_llama):
  """An adapter whose pools (B included) are random and small, as after some training."""
  adapter = adapt(tiny_llama.params, MOS)
  pools = jax.tree_util.tree_map(lambda x: 0.1 * x, random_pools(adapter.pools, seed=3))
  return adapter.replace(pools=pools)


def adapted_logits(model, params, adapter, ids=IDS):
  with inject(adapter), hf_numerics():
    return np.asarray(model(ids, params=params).logits)


def test_native_file_round_trip(tiny_llama, trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temp file left
  loaded = load_adapter(path, params=tiny_llama.params)
  assert loaded.routing == trained.routing and loaded.routing.digest == trained.routing.digest
  assert loaded.routing.config == MOS and loaded.routing.groups == trained.routing.groups
  assert loaded.routing.version == trained.routing.version and loaded.base_params == trained.base_params
  for g in trained.routing.groups:
    np.testing.assert_array_equal(loaded.routing.index_a[g.name], trained.routing.index_a[g.name])
    np.testing.assert_array_equal(loaded.routing.index_b[g.name], trained.routing.index_b[g.name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.pools, trained.pools)
  # Identical inputs to identical computations: bit-identical outputs.
  np.testing.assert_array_equal(adapted_logits(tiny_llama, tiny_llama.params, loaded),
                                adapted_logits(tiny_llama, tiny_llama.params, trained))


def test_native_file_keeps_bfloat16_pools_exactly(tiny_llama, tmp_path):
  adapter = adapt(tiny_llama.params, dataclasses.replace(MOS, pool_dtype="bfloat16"))
  pools = random_pools(adapter.pools, seed=1)
  loaded = load_adapter(save_adapter(tmp_path / "a.safetensors", adapter.replace(pools=pools)))
  # The base model's size is stored in the file, so it is known without params.
  assert adapter.base_params > 0 and loaded.base_params == adapter.base_params
  for got, want in zip(jax.tree_util.tree_leaves(loaded.pools), jax.tree_util.tree_leaves(pools)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_native_file_is_small_next_to_lora(tiny_llama, tmp_path):
  # MoS stores r_e·Σ L(d_in + d_out) pool values plus int32 routing; LoRA at the same active
  # rank (the PEFT export) stores r·Σ L(d_in + d_out): here r / r_e = 4.
  adapter = adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  native = save_adapter(tmp_path / "mos.safetensors", adapter).stat().st_size
  peft = (export_peft(tmp_path / "peft", adapter) / "adapter_model.safetensors").stat().st_size
  assert native < 0.5 * peft, (native, peft)


def two_layer_q_proj_model():
  return {"model": {"layers": {str(i): {"self_attn": {"q_proj": {"kernel": jnp.zeros((32, 32))}}}
                               for i in range(2)}}}


def test_native_file_refuses_another_model_and_damage(trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  with pytest.raises(MismatchError, match="another model") as err:
    load_adapter(path, params=two_layer_q_proj_model())
  # The kernels of a group this model lacks are named with their shapes.
  assert ("model/layers/0/mlp/up_proj: the adapter expects a kernel (32, 48), the params have none"
          in str(err.value))
  assert "model/layers/1/self_attn/q_proj]" not in str(err.value)  # shared kernels are no difference
  # A model with more layers than the adapter's: the extra kernels are named.
  with pytest.raises(MismatchError, match=r"model/layers/5/self_attn/q_proj: the params have a targeted kernel "
                                          r"\(32, 32\) the adapter has no factors for"):
    load_adapter(path, params={"model": {"layers": {str(i): {"self_attn": {"q_proj": {
        "kernel": jnp.zeros((32, 32))}}} for i in range(6)}}})

  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # one flipped byte in the last tensor: still valid safetensors
  garbled = tmp_path / "garbled.safetensors"
  garbled.write_bytes(bytes(data))
  with pytest.raises(CorruptError, match="checksum"):
    load_adapter(garbled)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CorruptError, match="not a readable safetensors"):
    load_adapter(truncated)
  # A file of the previous format (or of another tool) is refused by its format entry.
  with safe_open(str(path), framework="numpy") as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
  old = tmp_path / "old.safetensors"
  save_file(tensors, str(old), metadata={**meta, "format": "mos_jax.adapter/1"})
  with pytest.raises(CorruptError, match="format 'mos_jax.adapter/1', expected 'mos_jax.adapter/2'"):
    load_adapter(old)


def test_native_file_mismatch_names_the_shared_groups_missing_layers(trained, tmp_path):
  """The adapter's q_proj has 4 layers, this model's 2: that difference must lead the message,
  ahead of the 24 kernels of the groups this model lacks entirely."""
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  with pytest.raises(MismatchError, match="another model") as err:
    load_adapter(path, params=two_layer_q_proj_model())
  message = str(err.value)
  assert ("model/layers/*/self_attn/q_proj: the adapter has 4 kernels of this type, the params match 2"
          in message)
  assert "model/layers/3/self_attn/q_proj: the adapter expects a kernel (32, 32), the params have none" in message
  assert "... and 7 more" in message


def test_native_file_stores_the_groups_layouts(trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata()
  assert meta["format"] == "mos_jax.adapter/2"
  groups = json.loads(meta["groups"])
  assert groups["model/layers/*/self_attn/k_proj"] == {
      "paths": [f"model/layers/{i}/self_attn/k_proj" for i in range(4)], "kernel_shape": [32, 16],
      "in_axes": [0], "out_axes": [1], "num_layers": 4, "layer_axis": None}
  assert groups == mos_jax.core.adapter_identity(trained)["groups"]


def test_native_file_round_trips_a_declared_stack(tmp_path):
  """A stacked group's layer axis travels in the file: the loaded adapter merges the same."""
  params = {"layers": {"q": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 16)), jnp.float32)}}}
  adapter = adapt(params, MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2, target_modules=["q"],
                                    stacked_modules=["q"], layer_axis=1))
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  loaded = load_adapter(save_adapter(tmp_path / "stack.safetensors", adapter), params=params)
  assert loaded.groups == adapter.groups and loaded.groups[0].layer_axis == 1 and loaded.routing == adapter.routing
  np.testing.assert_array_equal(merge(params, loaded)["layers"]["q"]["kernel"],
                                merge(params, adapter)["layers"]["q"]["kernel"])
  with pytest.raises(MismatchError, match=r"layers/q: the adapter expects a kernel \(8, 3, 16\), the params have "
                                          r"\(3, 8, 16\)"):
    load_adapter(tmp_path / "stack.safetensors", params={"layers": {"q": {"kernel": jnp.zeros((3, 8, 16))}}})
  # A stack needs naming rules (with {layer}) to become per-layer PyTorch modules.
  with pytest.raises(NotImplementedError, match=r"is a stacked kernel \(8, 3, 16\): name its PyTorch modules"):
    export_peft(tmp_path / "peft", adapter)


def test_peft_export_layout_and_exact_delta_weights(trained, tmp_path):
  folder = export_peft(tmp_path / "peft", trained, base_model_name_or_path="tiny-llama")
  config = json.loads((folder / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"])
  assert config["base_model_name_or_path"] == "tiny-llama"
  with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
    keys = set(f.keys())
    a = f.get_tensor("base_model.model.model.layers.2.self_attn.k_proj.lora_A.weight")
    b = f.get_tensor("base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight")
  assert len(keys) == 4 * 7 * 2
  assert a.shape == (4, 32) and b.shape == (16, 4)  # (r, d_in), (d_out, r); GQA k_proj is 32 -> 16

  factors, scale = load_peft_factors(folder)
  assert scale == MOS.scale
  expected = layer_factors(trained)
  assert set(factors) == set(expected)
  for path, (a, b) in factors.items():
    np.testing.assert_array_equal(a, expected[path][0])
    np.testing.assert_array_equal(b, expected[path][1])
    np.testing.assert_array_equal(delta_weight(jnp.asarray(a), jnp.asarray(b), scale),
                                  delta_weight(*expected[path], MOS.scale))


def test_merged_export_loads_with_from_pretrained(tiny_llama, trained, tmp_path):
  folder = mos_jax.hf.export_merged(tmp_path / "merged", tiny_llama, tiny_llama.params, trained)
  assert (folder / "model.safetensors").exists() and not (folder / "flax_model.msgpack").exists()
  with hf_numerics():
    reloaded = FlaxLlamaForCausalLM.from_pretrained(folder)
  merged = merge(tiny_llama.params, trained)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, merged)
  with hf_numerics():
    logits = np.asarray(reloaded(IDS).logits)
    base = np.asarray(tiny_llama(IDS).logits)
  injected = adapted_logits(tiny_llama, tiny_llama.params, trained)
  assert np.abs(injected - base).max() > 1e-2  # the adapter changes the output...
  # ...and merged weights reproduce it up to float32 rounding of W + ΔW vs. W x + ΔW x.
  np.testing.assert_allclose(logits, injected, rtol=1e-5, atol=1e-5)


def test_exports_replace_an_existing_folder_whole(trained, tmp_path):
  folder = tmp_path / "peft"
  folder.mkdir()
  (folder / "stale.bin").write_text("old")
  export_peft(folder, trained)
  assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp folders left


def test_bert_export_names_modules_like_pytorch(tiny_bert, tmp_path):
  cfg = MoSConfig(rank=2, equivalent_rank=1, target_modules=("query", "attention/output/dense"))
  adapter = adapt(tiny_bert.params, cfg)
  factors, _ = load_peft_factors(export_peft(tmp_path / "p", adapter, task_type=None))
  assert "encoder/layer/1/attention/output/dense" in factors and len(factors) == 2 * 3
  config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["dense", "query"]


@pytest.mark.slow
def test_peft_adapter_in_pytorch_matches_mos_jax(tiny_llama, trained, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from transformers import LlamaForCausalLM
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

  torch.manual_seed(0)
  config = tiny_llama.config.__class__(**{**tiny_llama.config.to_dict(), "attn_implementation": "eager"})
  base = LlamaForCausalLM(config).eval()
  base = load_flax_weights_in_pytorch_model(base, jax.tree_util.tree_map(np.array, tiny_llama.params))
  folder = export_peft(tmp_path / "peft", trained)
  model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
  # Every exported factor was loaded (none left at PEFT's initialisation).
  a = model.base_model.model.model.layers[3].mlp.down_proj.lora_A["default"].weight.detach().numpy()
  with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
    np.testing.assert_array_equal(a, f.get_tensor("base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"))
  ids = torch.from_numpy(IDS).long()
  with torch.no_grad():
    torch_logits = model(ids).logits.numpy()
    with model.disable_adapter():
      torch_plain = model(ids).logits.numpy()
  ours = adapted_logits(tiny_llama, tiny_llama.params, trained)
  with hf_numerics():
    plain = np.asarray(tiny_llama(IDS).logits)

  def rel(x, ref):
    return np.abs(x - ref).max() / np.abs(ref).max()

  assert rel(torch_plain, plain) < 1e-5  # the same base model in both frameworks
  assert rel(ours, plain) > 1e-2  # the adapter matters, so the match below is not trivial
  assert rel(torch_logits, ours) < 1e-4, rel(torch_logits, ours)
