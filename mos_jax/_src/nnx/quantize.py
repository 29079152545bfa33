"""QLoRA on NNX: the adapted layers' base weights stored quantized by qwix, the pools in float.

qwix quantizes a module's weight at its first call under a ``PtqProvider`` (the weight becomes
a ``WithAux`` holding the quantized array and its scales) and runs the module's einsum or
matmul on it afterwards. Here each MoS layer's base module is quantized on its own, called once
with a zero input of the shape its kernel implies, so no model inputs are needed; the MoS term
is added outside the quantized call, in float.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from mos_jax._src.core.einsum import EinsumSpec

#: The qwix weight types of ``adapt(..., quantize=name)`` and their tile (block) size along the contracted
#: axis: 4-bit types in blocks of 64 as QLoRA does (per channel when 64 does not divide it), int8 per channel.
QTYPES: dict[str, int | None] = {"nf4": 64, "int4": 64, "int8": None}


def _provider(quantize: Any, d_in: int) -> Any:
  import qwix  # the [tunix] extra

  if isinstance(quantize, str):
    if quantize not in QTYPES:
      raise ValueError(f"quantize={quantize!r}: use one of {sorted(QTYPES)}, or a qwix.PtqProvider.")
    tile = QTYPES[quantize]
    tile = tile if tile is not None and d_in % tile == 0 else None
    return qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype=quantize, tile_size=tile)])
  if not isinstance(quantize, qwix.PtqProvider) or isinstance(quantize, qwix.LoraProvider):
    raise TypeError(f"quantize takes 'nf4', 'int8', 'int4' or a qwix.PtqProvider (weight quantization rules), "
                    f"got {type(quantize).__name__}. (qwix's LoraProvider adds its own LoRA: not with MoS.)")
  return quantize


def _zero_input(base: nnx.Module, kernel: Any) -> jnp.ndarray:
  """A one-token zero input of the shape ``base``'s kernel contracts."""
  equation = getattr(base, "einsum_str", None)
  if not isinstance(equation, str):
    return jnp.zeros((1, kernel.shape[0]), kernel.dtype)  # nnx.Linear: (d_in, d_out)
  spec = EinsumSpec.parse(equation)
  sizes = {c: kernel.shape[spec.rhs.index(c)] for c in spec.contracted}
  shape = ((1,) if spec.lhs.startswith("...") else ()) + tuple(sizes.get(c, 1) for c in spec.lhs.replace("...", ""))
  return jnp.zeros(shape, kernel.dtype)


def quantize_bases(layers: list[tuple[tuple[Any, ...], Any]], quantize: Any) -> None:
  """Replaces, in place, the base module of each MoS layer by its qwix-quantized copy.

  Args:
    layers: ``(keys, layer)`` of an adapted model's MoS layers (:func:`mos_jax.nnx.mos_layers`).
    quantize: ``"nf4"``, ``"int8"``, ``"int4"``, or a ``qwix.PtqProvider`` whose rules
      are matched against each base module's path in the model (``layers/0/attn/q_einsum/base``).

  Raises:
    ValueError: an unknown type name.
    TypeError: neither a name nor a ``qwix.PtqProvider``.
    NotImplementedError: a stacked (scanned) layer.
  """
  import qwix  # the [tunix] extra

  for keys, layer in layers:
    if layer.group.stacked:
      raise NotImplementedError(f"Group {layer.group.name!r} is stacked (nnx.scan): quantizing stacked base "
                                "kernels is not supported; adapt an unrolled model to quantize it.")
    if not isinstance(getattr(layer.base, layer.kernel_name), nnx.Variable):
      continue  # quantized already (a module reached under two names)
    kernel = getattr(layer.base, layer.kernel_name)
    x = _zero_input(layer.base, kernel)
    provider = _provider(quantize, x.shape[-1] if x.ndim else 1)
    quantized = qwix.quantize_model(layer.base, provider, x, skip_nnx_init=True)
    for sub, module in nnx.iter_modules(quantized):
      module.qwix_path = (*keys, "base", *sub)  # qwix matches its rules against this path
    quantized(x)  # qwix replaces each matched weight by its quantized form at this first call
    layer.base = quantized
