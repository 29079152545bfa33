"""The Flax NNX backend: MoS on any NNX model (Tunix Gemma 3 / Llama 3 / Qwen 3, MaxText-style, your own).

``adapt(model, config)`` returns a copy whose targeted layers are :class:`MoSLayer`
wrappers; the pools are ``nnx.LoRAParam`` (select them by type, as with
``flax.nnx.nn.lora`` and qwix), the routing static.
"""

from mos_jax.nnx._adapt import adapt, adapter_of, bind, load_pools, merge, mos_layers, unbind
from mos_jax.nnx._discover import KernelModule, kernel_modules
from mos_jax.nnx._layers import GroupPools, MoSFactor, MoSLayer, MoSModel, MoSStackedLayer
from mos_jax.nnx._names import PEFT_NAMES

#: The attention and MLP projections of a Tunix Gemma 3 decoder block.
GEMMA3_TARGETS: tuple[str, ...] = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj")

__all__ = ["adapt", "adapter_of", "bind", "load_pools", "merge", "mos_layers", "unbind", "KernelModule", "kernel_modules",
           "GroupPools", "MoSFactor", "MoSLayer", "MoSModel", "MoSStackedLayer", "GEMMA3_TARGETS", "PEFT_NAMES"]
