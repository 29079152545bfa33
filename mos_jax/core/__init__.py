"""The framework-free core of MoS: config, discovery, routing, pools, assembly, identity, counting.

Imports jax and numpy only (never flax), so every backend (``mos_jax.linen``,
NNX, scanned layers) builds on the same pieces.
"""

from mos_jax.core._adapter import Adapter, adapt, count_params, dry_run, require_adapter, summary, trainable_count
from mos_jax.core._assemble import (Factors, assemble, gather_factors, delta_weight, kernel_delta, layer_factors, low_rank_term,
                                    merge, unmerge)
from mos_jax.core._einsum import EinsumSpec
from mos_jax.core._config import BERT_TARGETS, LLAMA_TARGETS, MoSConfig
from mos_jax.core._files import MANIFEST, atomic_dir, atomic_file, canonical_json, recover, sha256_arrays, verify_manifest, write_manifest
from mos_jax.core._identity import (adapter_identity, as_json, differences,
                                    groups_from_identity, groups_identity, tree_layout)
from mos_jax.core._memory import AdapterCost, MemoryEstimate, dtype_bits, estimate_memory
from mos_jax.core._pools import Pools, check_pools, init_pools, pool_shapes
from mos_jax.core._routing import ROUTING_VERSION, Routing, check_group, check_indices, group_indices, make_routing
from mos_jax.core._stack import AdapterStack, check_ids, row_factors, stack_adapters
from mos_jax.core._targets import (DENSE, KERNEL, CorruptError, Group, MismatchError, KernelLayout, check_params, find_groups, kernel_leaves, kernel_module,
                                   matched_kernels, matches, path_str)

__all__ = [
    "Adapter", "adapt", "count_params", "dry_run", "require_adapter", "summary", "trainable_count",
    "Factors", "assemble", "gather_factors", "delta_weight", "kernel_delta", "layer_factors", "low_rank_term", "merge", "unmerge",
    "BERT_TARGETS", "LLAMA_TARGETS", "MoSConfig", "EinsumSpec",
    "MANIFEST", "atomic_dir", "atomic_file", "canonical_json", "recover", "sha256_arrays", "verify_manifest", "write_manifest",
    "CorruptError", "MismatchError", "adapter_identity", "as_json", "differences", "groups_from_identity",
    "groups_identity", "tree_layout",
    "AdapterCost", "MemoryEstimate", "dtype_bits", "estimate_memory",
    "Pools", "check_pools", "init_pools", "pool_shapes",
    "ROUTING_VERSION", "Routing", "check_group", "check_indices", "group_indices", "make_routing",
    "AdapterStack", "check_ids", "row_factors", "stack_adapters",
    "DENSE", "KERNEL", "Group", "KernelLayout", "check_params", "find_groups", "kernel_leaves", "kernel_module",
    "matched_kernels", "matches", "path_str",
]
