"""RoPE for Tunix 0.1.7's Llama 3 and Qwen 3 with the checkpoint's own ``rope_theta`` (and Llama 3.1's scaling).

Tunix 0.1.7's ``Llama3`` and ``Qwen3`` attention call their module's ``apply_rope(x, positions,
head_dim=...)`` without the config's ``rope_theta``, so every Llama 3 runs with theta 1,000,000
instead of its 500,000, and Llama 3.1/3.2's ``rope_scaling`` (``rope_type: llama3``) is ignored:
the logits differ from the checkpoint's.

:func:`config_class` makes a subclass of the family's ModelConfig that also records
``rope_scaling``; the loader builds such configs. Inside ``with using(model.config):`` (which
:func:`experiments.lib.nnx_models.hidden_states` enters) the module's ``apply_rope`` rotates with that
config's theta and scaling (HF's inverse frequencies,
``transformers.modeling_rope_utils._compute_llama3_parameters``; Tunix's split-half layout);
anywhere else, and for any other config, it is Tunix's own function, so other models in the
process are unaffected.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mos_tunix_rope", default=None)


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


@functools.cache
def _patched(module_name: str) -> None:
  """Wraps ``module.apply_rope`` once: the checkpoint's RoPE inside :func:`using`, Tunix's elsewhere."""
  module = importlib.import_module(module_name)
  original = module.apply_rope

  def apply_rope(inputs, positions, head_dim: int, rope_theta: Any = None, **kwargs):
    active = _ACTIVE.get()
    if active is None:
      return original(inputs, positions, head_dim=head_dim, **({} if rope_theta is None else
                                                                 {"rope_theta": rope_theta}), **kwargs)
    theta, scaling = active
    inv = jnp.asarray(inverse_frequencies(head_dim, theta, dict(scaling) or None))
    angles = positions[..., None].astype(jnp.float32) * inv[None, None, :]
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]
    first, second = jnp.split(inputs, 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(inputs.dtype)

  module.apply_rope = apply_rope


@functools.cache
def config_class(family: str) -> type:
  """The family's Tunix ModelConfig with a ``rope_scaling`` field (a tuple of ``(key, value)`` pairs)."""
  base = importlib.import_module(f"tunix.models.{family}.model").ModelConfig
  params = base.__dataclass_params__
  cls = dataclasses.make_dataclass(f"{base.__name__}WithRoPE", [("rope_scaling", tuple, dataclasses.field(default=()))],
                                   bases=(base,), frozen=params.frozen, slots=hasattr(base, "__slots__"))
  cls.__module__ = __name__
  return cls


@contextlib.contextmanager
def using(config: Any) -> Iterator[None]:
  """Within the block, Tunix's Llama 3 / Qwen 3 rotate with ``config``'s theta and scaling (a :func:`config_class`
  config; any other config leaves Tunix's function as it is)."""
  if not hasattr(config, "rope_scaling") or not hasattr(config, "rope_theta"):
    yield
    return
  for family in ("llama3", "qwen3"):
    _patched(f"tunix.models.{family}.model")
  token = _ACTIVE.set((float(config.rope_theta), tuple(config.rope_scaling)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)
