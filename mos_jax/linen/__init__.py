"""The Flax linen backend: inject adapters into linen (and HF Flax) models, serve many, quantized bases.

Every hook goes through one interceptor (:func:`intercept_kernel_calls`) over the
kernel layers MoS can adapt: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` and
HF's ``FlaxConv1D``.
"""

from mos_jax.linen._inject import MOS_A, MOS_B, MOS_LAYER, adapted_loss, attach, inject, kernel_layouts, scanned_layer
from mos_jax.linen._intercept import intercept_kernel_calls, module_input
from mos_jax.linen._quantize import (NF4_CODEBOOK, NF4Kernel, QuantizedBytes, QuantizedKernel, dense_on_quantized,
                                     dequantize, dequantized_dense, is_quantized, quantize, quantize_int8,
                                     quantize_nf4, quantized_bytes)
from mos_jax.linen._serving import inject_multi, serve
from mos_jax.linen._train import make_train_step

__all__ = [
    "MOS_A", "MOS_B", "MOS_LAYER", "adapted_loss", "attach", "inject", "scanned_layer", "kernel_layouts", "intercept_kernel_calls", "module_input", "inject_multi", "serve",
    "make_train_step",
    "NF4_CODEBOOK", "NF4Kernel", "QuantizedBytes", "QuantizedKernel", "dense_on_quantized", "dequantize",
    "dequantized_dense", "is_quantized", "quantize", "quantize_int8", "quantize_nf4", "quantized_bytes",
]
