"""RoPE for Tunix 0.1.7's Llama 3 and Qwen 3 with the checkpoint's own ``rope_theta`` (and Llama 3.1's scaling).

Tunix 0.1.7's ``Llama3`` and ``Qwen3`` attention call their module's ``apply_rope(x, positions,
head_dim=...)`` without the config's ``rope_theta``, so every Llama 3 runs with theta 1,000,000
instead of its 500,000, and Llama 3.1/3.2's ``rope_scaling`` (``rope_type: llama3``) is ignored:
the logits differ from the checkpoint's. :func:`install` replaces that module function with one
that uses the loaded model's values (the same rotation otherwise: Tunix's split-half layout,
HF's inverse frequencies, ``transformers.modeling_rope_utils._compute_llama3_parameters``). It is
process-wide: one Llama 3 / Qwen 3 RoPE setting per process (the last installed wins, with a
warning when it changes), which is what a training process needs.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

_INSTALLED: dict[str, tuple] = {}


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
  """``(head_dim // 2,)`` float32 inverse frequencies, with Llama 3's scaling when ``scaling`` says ``llama3``.

  Raises:
    ValueError: a scaling type other than ``llama3`` (named).
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if not scaling:
    return inv.astype(np.float32)
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind != "llama3":
    raise ValueError(f"rope_scaling type {kind!r} is not supported for this family (only 'llama3').")
  factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def install(family: str, head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> None:
  """Makes ``tunix.models.<family>.model.apply_rope`` rotate with ``theta`` and ``scaling``.

  Args:
    family: ``llama3`` or ``qwen3``.
    head_dim: the model's head dimension.
    theta: config.json's ``rope_theta``.
    scaling: config.json's ``rope_scaling`` (``None``, or ``rope_type: llama3``).
  """
  key = (head_dim, float(theta), tuple(sorted((scaling or {}).items())))
  if _INSTALLED.get(family) not in (None, key):
    warnings.warn(f"Tunix {family} RoPE changes from {_INSTALLED[family]} to {key} for this process.", stacklevel=2)
  module = importlib.import_module(f"tunix.models.{family}.model")
  inv = inverse_frequencies(head_dim, theta, scaling)

  def apply_rope(inputs, positions, head_dim: int = head_dim, rope_theta: Any = None):  # noqa: ARG001
    # Tunix's layout: rotate (first half, second half) pairs; positions [B, L] -> angles [B, L, 1, D/2].
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv)[None, None, :]
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]
    first, second = jnp.split(inputs, 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(inputs.dtype)

  module.apply_rope = apply_rope
  _INSTALLED[family] = key
