"""Every Python snippet of docs/nnx.md runs, in order, on the tiny models it names (or stand-ins the test makes).

Two lines name things a reader has and a test does not: the Sampler's tokenizer (a toy one here) and the
HF checkpoint folder and its config (a folder of random tensors with HF's names, for a tiny Llama 3).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from oracles.helpers import REPO_ROOT, hf_numerics

pytest.importorskip("tunix.models.gemma3.model")
pytest.importorskip("qwix")
safetensors = pytest.importorskip("safetensors.numpy")

TINY_LLAMA = ("llama3.ModelConfig(num_layers=8, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, "
              "head_dim=8, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)")


class ToyTokenizer:
  """Characters as token ids (mod the tiny vocabulary): what Tunix's TokenizerAdapter needs of a tokenizer."""

  def encode(self, text, **kwargs):
    return [3 + ord(c) % 120 for c in text]

  def decode(self, ids, **kwargs):
    return "".join(chr(97 + int(i) % 26) for i in ids)

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


def hf_llama_folder(folder, layers=8, vocab=64, d=32, hidden=48, heads=4, kv=2, hd=8):
  """Random weights under the names (and PyTorch shapes) of an HF Llama checkpoint."""
  rng = np.random.default_rng(0)
  t = lambda *s: (0.1 * rng.normal(size=s)).astype(np.float32)
  tensors = {"model.embed_tokens.weight": t(vocab, d), "model.norm.weight": t(d), "lm_head.weight": t(vocab, d)}
  for i in range(layers):
    p = f"model.layers.{i}"
    tensors.update({f"{p}.self_attn.q_proj.weight": t(heads * hd, d), f"{p}.self_attn.k_proj.weight": t(kv * hd, d),
                    f"{p}.self_attn.v_proj.weight": t(kv * hd, d), f"{p}.self_attn.o_proj.weight": t(d, heads * hd),
                    f"{p}.mlp.gate_proj.weight": t(hidden, d), f"{p}.mlp.up_proj.weight": t(hidden, d),
                    f"{p}.mlp.down_proj.weight": t(d, hidden), f"{p}.input_layernorm.weight": t(d),
                    f"{p}.post_attention_layernorm.weight": t(d)})
  folder.mkdir()
  safetensors.save_file(tensors, str(folder / "model.safetensors"))
  return tensors


@pytest.mark.slow  # over a minute on 2 loaded cores; the slow suite runs it
def test_every_nnx_doc_snippet_runs(tmp_path):
  text = (REPO_ROOT / "docs" / "nnx.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 6, "docs/nnx.md lost its snippets"
  code = "\n".join(blocks)
  for line, stand_in in ((r'folder = "/path/to/Llama-3.2-1B"', f'folder = "{tmp_path / "hf"}"'),
                         ("config = llama3.ModelConfig.llama3p2_1b()", f"config = {TINY_LLAMA}")):
    assert line in code
    code = code.replace(line, stand_in)
  tensors = hf_llama_folder(tmp_path / "hf")
  scope = {"my_tokenizer": ToyTokenizer()}
  with hf_numerics():
    exec(compile(code, str(REPO_ROOT / "docs" / "nnx.md"), "exec"), scope)  # noqa: S102
  import mos_jax
  # What the snippets claim: QLoRA stored its base quantized, the trainer moved the pools, the sampler
  # generated, Tunix's loader put the HF weights in, the pure step trained.
  assert all(type(getattr(l.base, l.kernel_name)).__name__ == "WithAux" for _, l in mos_jax.nnx.mos_layers(scope["qlora"]))
  assert len(scope["out"].text) == 1
  q = scope["hf_model"].layers[1].attn.q_proj.w[...]
  np.testing.assert_allclose(np.asarray(q).reshape(32, 32), tensors["model.layers.1.self_attn.q_proj.weight"].T)
  assert len(mos_jax.nnx.mos_layers(scope["adapted_llama"])) == 8 * 7
  assert np.isfinite(float(scope["loss"]))
  assert float(jnp.abs(scope["adapter"].pools["layers/*/attn/q_einsum"]["B"]).max()) > 0
