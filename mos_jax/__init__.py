"""mos_jax: Mixture of Shards (MoS) low-rank adapters for Flax models."""

from mos_jax._adapter import Adapter, adapt, dry_run, summary, trainable_count
from mos_jax._assemble import Factors, assemble, layer_factors
from mos_jax._config import BERT_TARGETS, LLAMA_TARGETS, MoSConfig
from mos_jax._generate import generate
from mos_jax._inject import inject, low_rank_term
from mos_jax._memory import AdapterCost, MemoryEstimate, estimate_memory, param_shapes
from mos_jax._merge import delta_weight, merge, unmerge
from mos_jax._pools import Pools, init_pools, pool_shapes
from mos_jax._sharding import (MeshConfig, base_shardings, base_spec, batch_sharding, init_opt_state,
                               make_mesh, make_sharded_train_step, pool_shardings)
from mos_jax import _distributed as distributed
from mos_jax._routing import ROUTING_VERSION, Routing, make_routing
from mos_jax._targets import Group, find_groups
from mos_jax._train import adapted_loss, make_train_step

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterCost", "BERT_TARGETS", "MeshConfig", "Factors", "Group", "LLAMA_TARGETS", "MemoryEstimate", "MoSConfig", "Pools",
    "ROUTING_VERSION", "Routing", "adapt", "adapted_loss", "assemble", "base_shardings", "base_spec", "batch_sharding", "delta_weight",
    "dry_run", "estimate_memory", "find_groups", "generate", "init_opt_state", "init_pools", "inject", "layer_factors", "low_rank_term",
    "make_mesh", "make_routing", "make_sharded_train_step", "make_train_step", "merge", "param_shapes", "pool_shapes", "pool_shardings", "summary", "trainable_count",
    "unmerge",
]
