"""PEFT LoRA export: the layout PEFT reads, exact factors, whole-folder replaces, a manifest (PyTorch PEFT: slow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import mos_jax.hf
from mos_jax import CorruptError, MoSConfig, adapt, export_peft
from mos_jax.core import delta_weight, layer_factors
from mos_jax.formats import load_peft_factors
from oracles.helpers import (EXPORT_CONFIG, TOKEN_IDS, assert_close, folder_entries, hf_numerics, injected_logits,
                             trained_adapter)


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
  assert folder_entries(tmp_path) == ["peft"]  # no temp folders left


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
  import peft
  import torch
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


# --- reading folders PyTorch PEFT wrote (issue 20.1) ------------------------------------------------

MODULES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 4),
           "model.layers.0.mlp.up_proj": (8, 12)}


def write_peft(folder, config, ranks=None, extra=None):
  """A PEFT LoRA folder written by hand, as PEFT's save_pretrained lays it out (no manifest)."""
  rng = np.random.default_rng(0)
  tensors = {}
  for module, (d_in, d_out) in MODULES.items():
    r = (ranks or {}).get(module, config.get("r", 4))
    tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(np.float32)
    tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(np.float32)
  tensors.update(extra or {})
  folder.mkdir(parents=True)
  (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
  save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
  return folder, tensors


def test_rslora_folders_are_scaled_by_alpha_over_sqrt_r(tmp_path):
  """rsLoRA scales by alpha/sqrt(r): read as alpha/r, the loaded ΔW was half the trained one (r=4)."""
  folder, tensors = write_peft(tmp_path / "rs", {"use_rslora": True})
  factors, scale = load_peft_factors(folder)
  assert scale == 8 / 2.0
  a, b = factors["model/layers/0/self_attn/q_proj"]
  np.testing.assert_array_equal(a, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
  np.testing.assert_array_equal(b, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_rank_and_alpha_patterns_give_each_module_its_scale(tmp_path):
  """rank_pattern/alpha_pattern were ignored: every module got lora_alpha / r."""
  from mos_jax.formats import load_peft
  ranks = {"model.layers.0.self_attn.v_proj": 2}
  folder, _ = write_peft(tmp_path / "p", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.0.mlp.up_proj": 32,
                                                                                            "proj": 99}}, ranks)
  modules = load_peft(folder)
  scales = {path: m.scale for path, m in modules.items()}
  # PEFT's matching: a pattern fullmatches the module name or a dotted suffix of it ("proj" matches nothing here).
  assert scales == {"model/layers/0/self_attn/q_proj": 8 / 4, "model/layers/0/self_attn/v_proj": 8 / 2,
                    "model/layers/0/mlp/up_proj": 32 / 4}
  assert modules["model/layers/0/self_attn/v_proj"].a.shape == (2, 8)
  with pytest.raises(ValueError, match=r"rank_pattern/alpha_pattern give the modules 3 different scales.*load_peft"):
    load_peft_factors(folder)
  folder, _ = write_peft(tmp_path / "bad", {"rank_pattern": {"v_proj": 3}}, ranks)
  with pytest.raises(CorruptError, match=r"v_proj' has lora_A \(2, 8\) and lora_B \(4, 2\), but the config gives "
                                         r"it rank 3"):
    load_peft(folder)


@pytest.mark.parametrize("config, extra, message", [
    ({"use_dora": True}, {"base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": np.ones(12, np.float32)},
     r"use_dora=True \(DoRA rescales"),
    ({"modules_to_save": ["score"]}, {"base_model.model.score.weight": np.ones((2, 8), np.float32)},
     r"modules_to_save=\['score'\] \(the folder holds full copies"),
    ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((4, 16), np.float32),
          "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((8, 4), np.float32)},
     r"2 tensor\(s\) mos_jax cannot read as LoRA factors.*LoRA on an embedding"),
    ({"lora_bias": True}, {}, r"lora_bias=True \(lora_B carries a bias\)"),
    ({"bias": "all"}, {}, r"bias='all' \(the folder holds trained biases"),
    ({"init_lora_weights": "pissa_niter_4"}, {}, r"init_lora_weights='pissa_niter_4'.*path_initial_model_for_weight"),
    ({"peft_type": "LOHA"}, {}, r"peft_type is 'LOHA'; only LORA"),
    ({"future_option": {"on": True}}, {}, r"future_option=\{'on': True\} \(an option this version does not know"),
], ids=["dora", "modules_to_save", "embedding", "lora_bias", "bias", "pissa", "loha", "unknown"])
def test_what_lora_factors_cannot_express_is_refused_by_name(tmp_path, config, extra, message):
  """DoRA and modules_to_save loaded silently without their extra weights; embedding LoRA was a raw KeyError."""
  folder, _ = write_peft(tmp_path / "p", config, extra=extra)
  with pytest.raises(ValueError, match=message):
    load_peft_factors(folder)


def test_a_folder_without_the_adapter_files_is_named(tmp_path):
  folder, _ = write_peft(tmp_path / "p", {})
  (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
  with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors \(adapter_model.bin is PyTorch's pickle"):
    load_peft_factors(folder)
  with pytest.raises(FileNotFoundError, match="No such export folder"):
    load_peft_factors(tmp_path / "missing")


# --- export names (issue 20.2) -----------------------------------------------------------------------

def test_naming_rules_that_map_two_modules_to_one_peft_module_are_refused(trained, tmp_path):
  """A rule without the layer index exported 4 layers as 1 module (the last one), silently."""
  good = [(r"model/layers/(\d+)/(self_attn|mlp)/(\w+)", (r"model.layers.\1.\2.\3",))]
  factors, _ = load_peft_factors(export_peft(tmp_path / "good", trained, names=good))
  assert len(factors) == 4 * 7
  no_layer = [(r"model/layers/\d+/(self_attn|mlp)/(\w+)", (r"model.layers.0.\1.\2",))]
  with pytest.raises(ValueError, match=r"maps two modules to one PEFT module 'model.layers.0.mlp.down_proj': "
                                       r"'model/layers/0/mlp/down_proj' and 'model/layers/1/mlp/down_proj'"):
    export_peft(tmp_path / "bad", trained, names=no_layer)
  one_name = [(r"model/layers/(\d+)/(self_attn|mlp)/\w+", (r"model.layers.\1.\2.proj",))]
  with pytest.raises(ValueError, match=r"maps two modules to one PEFT module 'model.layers.0.mlp.proj'"):
    export_peft(tmp_path / "bad", trained, names=one_name)
  template = [(r"model/layers/\d+/(self_attn|mlp)/(\w+)", (r"model.layers.{layer}.\1.\2",))]
  with pytest.raises(ValueError, match=r"is not a stacked kernel, so its rule's '\{layer\}'.*regex group"):
    export_peft(tmp_path / "bad", trained, names=template)
  assert folder_entries(tmp_path) == ["good"]  # nothing written


def _torch_peft_folder(tmp_path, name, **lora):
  """A tiny PyTorch model adapted by PEFT itself with ``LoraConfig(**lora)``, random factors, saved."""
  import peft
  import torch

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj, self.v_proj, self.up_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 12)

  class Tiny(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = torch.nn.Embedding(16, 8)
      self.layers = torch.nn.ModuleList([Block() for _ in range(2)])
      self.lm_head = torch.nn.Linear(8, 16)

  torch.manual_seed(0)
  model = peft.get_peft_model(Tiny(), peft.LoraConfig(**lora))
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "lora_" in param_name:
        param.normal_()  # lora_B starts at zero: make every factor count
  model.save_pretrained(str(tmp_path / name))
  with torch.no_grad():
    deltas = {mod_name.removeprefix("base_model.model.").replace(".", "/"): module.get_delta_weight("default").numpy()
              for mod_name, module in model.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
  return tmp_path / name, deltas


@pytest.mark.slow
@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "layers.1.up_proj": 6}, alpha_pattern={"q_proj": 32}),
], ids=["rslora", "patterns"])
def test_folders_pytorch_peft_wrote_give_its_delta_weights(tmp_path, lora):
  """Issue 20.1: against PEFT's own ``get_delta_weight``, the loaded ΔW was off by 50-75% (rsLoRA, patterns)."""
  from mos_jax.formats import load_peft
  folder, deltas = _torch_peft_folder(tmp_path, "p", target_modules=["q_proj", "v_proj", "up_proj"], **lora)
  modules = load_peft(folder)
  assert set(modules) == set(deltas) and len(deltas) == 6
  for path, m in modules.items():
    assert_close(m.scale * (m.b.astype(np.float64) @ m.a), deltas[path], rtol=1e-6)
  if "use_rslora" in lora:
    factors, scale = load_peft_factors(folder)
    assert scale == 8 / 2.0 and factors.keys() == deltas.keys()


@pytest.mark.slow
@pytest.mark.parametrize("lora, message", [
    (dict(use_dora=True), r"use_dora=True \(DoRA"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
    (dict(target_modules=["q_proj", "embed_tokens"]), r"LoRA on an embedding"),
], ids=["dora", "modules_to_save", "embedding"])
def test_folders_pytorch_peft_wrote_with_dora_saved_modules_or_embeddings_are_refused(tmp_path, lora, message):
  folder, _ = _torch_peft_folder(tmp_path, "p", **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **lora})
  with pytest.raises(ValueError, match=message):
    load_peft_factors(folder)
