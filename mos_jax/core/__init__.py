"""The framework-free core of MoS: config, adapter value, assembly, merging, counting, stacking.

Imports jax and numpy only (never flax), so every backend (``mos_jax.linen``,
``mos_jax.nnx``, scanned layers) builds on the same pieces.

Example:
  >>> import jax.numpy as jnp
  >>> from mos_jax import core
  >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(2)}}
  >>> adapter = core.adapt(params, core.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
  >>> [(g.name, g.num_layers) for g in adapter.spec.groups]
  [('layers/*/q_proj', 2)]
"""

# The config.
from mos_jax._src.core.config import MoSConfig  # Hyper-parameters of an adapter (ranks, targets, strategies, seed).
from mos_jax._src.core.config import LLAMA_TARGETS  # The seven projections of a LLaMA-family decoder block.
from mos_jax._src.core.config import BERT_TARGETS  # Every attention and MLP dense layer of a HF Flax BERT encoder.
# The adapter value and its static spec.
from mos_jax._src.core.adapter import Adapter  # Trainable pools + static spec, one pytree whose leaves are the pools.
from mos_jax._src.core.routing import AdapterSpec  # The static half: config, groups, routing index arrays, version.
from mos_jax._src.core.routing import ROUTING_VERSION  # Version of the routing draw written into files and checkpoints.
from mos_jax._src.core.routing import make_spec  # Draws an AdapterSpec for groups from config.seed.
from mos_jax._src.core.targets import find_groups  # The kernels a config targets in params, grouped by module type.
from mos_jax._src.core.targets import Group  # One module type: its L kernels' paths, shape and layout.
from mos_jax._src.core.targets import KernelLayout  # How a kernel acts as a linear map (contracted / free axes).
from mos_jax._src.core.targets import path_str  # A jax key path joined with "/", as every name in mos_jax is.
# Making, using and folding an adapter.
from mos_jax._src.core.adapter import adapt  # A fresh Adapter for a params pytree.
from mos_jax._src.core.adapter import dry_run  # What adapt would match and create, allocating nothing.
from mos_jax._src.core.adapter import summary  # A per-group table of an adapter's parameters (like PEFT's).
from mos_jax._src.core.assemble import assemble  # Every group's stacked factors A, B (one gather per pool).
from mos_jax._src.core.assemble import layer_factors  # Module path -> (A_i, B_i).
from mos_jax._src.core.assemble import low_rank_term  # scale·(x Aᵀ) Bᵀ without forming ΔW (a custom_vjp).
from mos_jax._src.core.pallas import fused_dense  # x W + scale·(x Aᵀ) Bᵀ as Pallas kernels (GPU/TPU; docs/pallas.md).
from mos_jax._src.core.assemble import delta_weight  # ΔW = scale·Aᵀ Bᵀ as a (d_in, d_out) matrix.
from mos_jax._src.core.assemble import merge  # Params with ΔW added to every adapted kernel.
from mos_jax._src.core.assemble import unmerge  # The inverse of merge.
# Counting.
from mos_jax._src.core.adapter import count_params  # Number of scalars in a pytree.
from mos_jax._src.core.adapter import trainable_count  # Trainable parameters of a config on some groups.
from mos_jax._src.core.memory import estimate_memory  # Memory of MoS vs LoRA vs full fine-tuning, from shapes only.
from mos_jax._src.core.memory import MemoryEstimate  # What estimate_memory returns (a table via str()).
# Many adapters of one model (serving).
from mos_jax._src.core.stack import AdapterStack  # K adapters of one model stacked along a leading axis.
from mos_jax._src.core.stack import stack_adapters  # Stacks adapters made for the same model and shapes.
from mos_jax._src.core.stack import row_factors  # Each batch row's (A, B) for one layer, gathered from a stack.
# Errors.
from mos_jax._src.errors import MismatchError  # Made for another model, config, spec or state layout.
from mos_jax._src.errors import CorruptError  # A file or checkpoint that cannot be read back as written.

__all__ = [
    "MoSConfig", "LLAMA_TARGETS", "BERT_TARGETS",
    "Adapter", "AdapterSpec", "ROUTING_VERSION", "make_spec", "find_groups", "Group", "KernelLayout", "path_str",
    "adapt", "dry_run", "summary", "assemble", "layer_factors", "low_rank_term", "fused_dense",
    "delta_weight", "merge", "unmerge",
    "count_params", "trainable_count", "estimate_memory", "MemoryEstimate",
    "AdapterStack", "stack_adapters", "row_factors",
    "MismatchError", "CorruptError",
]
