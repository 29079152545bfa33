"""PEFT LoRA export: the layout PEFT reads, exact factors, whole-folder replaces, a manifest (PyTorch PEFT: slow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import mos_jax.hf
from mos_jax import CorruptError, MoSConfig, adapt, export_peft
from mos_jax.core import delta_weight, layer_factors
from mos_jax.formats import load_peft_factors
from oracles.helpers import EXPORT_CONFIG, TOKEN_IDS, hf_numerics, injected_logits, trained_adapter


@pytest.fixture(scope="module")
def trained(tiny_llama):
  return trained_adapter(tiny_llama.params, EXPORT_CONFIG)


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
  assert scale == EXPORT_CONFIG.scale
  expected = layer_factors(trained)
  assert set(factors) == set(expected)
  for path, (a, b) in factors.items():
    np.testing.assert_array_equal(a, expected[path][0])
    np.testing.assert_array_equal(b, expected[path][1])
    np.testing.assert_array_equal(delta_weight(jnp.asarray(a), jnp.asarray(b), scale),
                                  delta_weight(*expected[path], EXPORT_CONFIG.scale))


def test_exports_replace_an_existing_folder_whole(trained, tmp_path):
  folder = tmp_path / "peft"
  folder.mkdir()
  (folder / "stale.bin").write_text("old")
  export_peft(folder, trained)
  assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "mos_jax_manifest.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp folders left


def test_exports_carry_a_manifest_that_catches_damage(tiny_llama, trained, tmp_path):
  from mos_jax.formats import verify_export
  peft = export_peft(tmp_path / "peft", trained)
  merged = mos_jax.hf.export_merged(tmp_path / "merged", tiny_llama, tiny_llama.params, trained)
  for folder, name in ((peft, "adapter_model.safetensors"), (merged, "model.safetensors"),
                       (peft, "adapter_config.json")):
    assert verify_export(folder)
    original = (folder / name).read_bytes()
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x04
    (folder / name).write_bytes(bytes(flipped))
    with pytest.raises(CorruptError, match=f"{name}: content differs"):
      verify_export(folder)
    if folder == peft:
      with pytest.raises(CorruptError, match="checksum mismatch"):
        load_peft_factors(folder)
    (folder / name).write_bytes(original[:-10])
    with pytest.raises(CorruptError, match=f"{name}: {len(original) - 10} bytes, {len(original)} written"):
      verify_export(folder)
    (folder / name).write_bytes(original)
    assert verify_export(folder)
  (peft / "extra.bin").write_bytes(b"x")
  with pytest.raises(CorruptError, match="extra.bin: not in the manifest"):
    verify_export(peft)


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
  ids = torch.from_numpy(TOKEN_IDS).long()
  with torch.no_grad():
    torch_logits = model(ids).logits.numpy()
    with model.disable_adapter():
      torch_plain = model(ids).logits.numpy()
  ours = injected_logits(tiny_llama, tiny_llama.params, trained)
  with hf_numerics():
    plain = np.asarray(tiny_llama(TOKEN_IDS).logits)

  def rel(x, ref):
    return np.abs(x - ref).max() / np.abs(ref).max()

  assert rel(torch_plain, plain) < 1e-5  # the same base model in both frameworks
  assert rel(ours, plain) > 1e-2  # the adapter matters, so the match below is not trivial
  assert rel(torch_logits, ours) < 1e-4, rel(torch_logits, ours)
