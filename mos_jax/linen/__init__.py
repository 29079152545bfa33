"""The Flax linen backend: adapters on linen (and HF Flax) models, many adapters in one batch, quantized bases.

Every hook goes through one interceptor (:func:`intercept_kernel_calls`) over the
kernel layers MoS can adapt: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` and
HF's ``FlaxConv1D``. A linen model's adapter is a value beside its params, so the
params-level verbs of the root serve linen directly.

The verbs, the same job under the same name in each backend:

===============  ============================================  ================================================
verb             linen (params + an ``Adapter`` value)         NNX (an adapted model)
===============  ============================================  ================================================
adapt            ``mos_jax.adapt(params, config)`` -> Adapter  ``mos_jax.nnx.adapt(model, config)`` -> model
dry_run          ``mos_jax.dry_run(params, config)``           (to come)
merge            ``mos_jax.merge(params, adapter)`` -> params  ``mos_jax.nnx.merge(model)`` -> plain model
kernel_layouts   ``kernel_layouts(fn, *args)``;                (read from the modules by ``adapt``)
                 HF: ``mos_jax.hf.kernel_layouts(model)``
inject           ``with inject(adapter): ...``                 (the adapted model applies its terms)
make_train_step  ``make_train_step(loss_fn, optimizer)``       ``mos_jax.train.make_step`` over unbind/bind
adapter_of       (the adapter is already a value)              ``adapter_of(model)`` -> Adapter (a copy)
load_pools       (replace the value)                           ``load_pools(model, adapter)``, in place
unbind / bind    (not needed)                                  ``unbind(model)`` -> (graphdef, adapter, state);
                                                               ``bind(graphdef, adapter, state)`` -> model
===============  ============================================  ================================================
"""

# Applying an adapter.
from mos_jax._src.linen.inject import inject  # Context manager: adds every adapted layer's low-rank term.
from mos_jax._src.linen.inject import with_factors  # Params with stacked factors beside their kernels (nn.scan).
from mos_jax._src.linen.inject import kernel_layouts  # How each kernel layer a function calls applies its kernel.
# Training.
from mos_jax._src.linen.inject import adapted_loss  # A base-model loss turned into a loss of the adapter.
from mos_jax._src.linen.train import make_train_step  # The jitted optax step that trains an Adapter on a linen model.
# Many adapters in one batch.
from mos_jax._src.linen.serving import inject_multi  # Like inject, with a per-row adapter id into an AdapterStack.
from mos_jax._src.linen.serving import serve  # Wraps a multi-adapter forward so bad ids raise before it runs.
# Hooks of your own.
from mos_jax._src.linen.intercept import intercept_kernel_calls  # Routes kernel layers' calls through a handler.
from mos_jax._src.linen.intercept import module_input  # The input array of an intercepted layer call.
# Quantized frozen bases.
from mos_jax._src.linen.quantize import quantize  # int8 / NF4-quantized copy of the selected kernels of params.
from mos_jax._src.linen.quantize import quantize_int8  # One kernel as int8 with per-output-column scales.
from mos_jax._src.linen.quantize import quantize_nf4  # One kernel as packed NF4 with per-block scales.
from mos_jax._src.linen.quantize import dequantize  # Params with every quantized kernel dequantized.
from mos_jax._src.linen.quantize import dequantized_dense  # Context manager: nn.Dense runs on quantized kernels.
from mos_jax._src.linen.quantize import dense_on_quantized  # One dense layer on a quantized kernel.
from mos_jax._src.linen.quantize import is_quantized  # Whether a params node is a quantized kernel.
from mos_jax._src.linen.quantize import quantized_bytes  # Bytes of quantized vs float params.
from mos_jax._src.linen.quantize import QuantizedKernel  # An int8 kernel node.
from mos_jax._src.linen.quantize import NF4Kernel  # An NF4 kernel node.

__all__ = [
    "inject", "with_factors", "kernel_layouts", "adapted_loss", "make_train_step", "inject_multi", "serve",
    "intercept_kernel_calls", "module_input",
    "quantize", "quantize_int8", "quantize_nf4", "dequantize", "dequantized_dense", "dense_on_quantized",
    "is_quantized", "quantized_bytes", "QuantizedKernel", "NF4Kernel",
]
