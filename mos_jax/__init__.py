"""mos_jax: Mixture of Shards (MoS) low-rank adapters for Flax models."""

from mos_jax import _distributed as distributed
from mos_jax._adapter import Adapter, adapt, dry_run, summary, trainable_count
from mos_jax._assemble import Factors, assemble, layer_factors
from mos_jax._checkpoint import (CheckpointCorruptError, CheckpointMismatchError, Restored, TrainCheckpointer,
                                 adapter_identity)
from mos_jax._config import BERT_TARGETS, LLAMA_TARGETS, MoSConfig
from mos_jax._export import export_merged, export_peft, load_mos_adapter, load_peft_factors, save_mos_adapter
from mos_jax._generate import generate
from mos_jax._inject import inject, low_rank_term
from mos_jax._memory import AdapterCost, MemoryEstimate, estimate_memory, param_shapes
from mos_jax._merge import delta_weight, merge, unmerge
from mos_jax._pools import Pools, init_pools, pool_shapes
from mos_jax._quantize import (NF4Kernel, QuantizedBytes, QuantizedKernel, dequantize, dequantized_dense,
                               quantize, quantized_bytes)
from mos_jax._routing import ROUTING_VERSION, Routing, make_routing
from mos_jax._serving import AdapterStack, inject_multi, stack_adapters
from mos_jax._sharding import (MeshConfig, base_shardings, base_spec, batch_sharding, init_opt_state, make_mesh,
                               make_sharded_train_step, pool_shardings)
from mos_jax._targets import Group, find_groups
from mos_jax._train import adapted_loss, make_train_step

__version__ = "0.1.0"

__all__ = [
    # core
    "MoSConfig", "LLAMA_TARGETS", "BERT_TARGETS", "Adapter", "adapt", "dry_run", "summary", "trainable_count",
    "Group", "find_groups", "Routing", "ROUTING_VERSION", "make_routing", "Pools", "init_pools", "pool_shapes",
    "Factors", "assemble", "layer_factors", "inject", "low_rank_term", "merge", "unmerge", "delta_weight",
    "adapted_loss", "make_train_step", "generate",
    # scale-out
    "MeshConfig", "make_mesh", "base_spec", "base_shardings", "pool_shardings", "batch_sharding",
    "init_opt_state", "make_sharded_train_step", "distributed",
    # state, export, serving
    "TrainCheckpointer", "Restored", "CheckpointMismatchError", "CheckpointCorruptError", "adapter_identity",
    "save_mos_adapter", "load_mos_adapter", "export_peft", "load_peft_factors", "export_merged",
    "AdapterStack", "stack_adapters", "inject_multi",
    # memory
    "AdapterCost", "MemoryEstimate", "estimate_memory", "param_shapes",
    "quantize", "dequantize", "dequantized_dense", "quantized_bytes", "QuantizedBytes", "QuantizedKernel",
    "NF4Kernel",
]
