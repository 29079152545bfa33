"""mos_jax: Mixture of Shards (MoS) low-rank adapters for JAX/Flax models.

The root holds the backend-neutral API: an adapter is one value (trainable pools
plus a static :class:`AdapterSpec`) made for a params pytree, assembled, merged,
saved and checkpointed the same way whatever runs the model. The rest lives in
themed subpackages: ``mos_jax.core`` (framework-free pieces), ``mos_jax.linen``
(linen backend: ``inject``, ``make_train_step``, multi-adapter serving, quantized
bases), ``mos_jax.nnx`` (Flax NNX backend), ``mos_jax.formats`` (adapter files),
``mos_jax.train`` (step, checkpoints), ``mos_jax.parallel`` (meshes, multi-host)
and ``mos_jax.hf`` (HF ``transformers`` glue, optional extra).

Example:
  >>> import jax.numpy as jnp, optax, mos_jax
  >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(4)}}
  >>> adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=4, equivalent_rank=1, target_modules=["q_proj"]))
  >>> opt_state = optax.adam(1e-3).init(adapter)   # only the pools are leaves
  >>> merged = mos_jax.merge(params, adapter)
"""

from mos_jax import core, formats, linen, nnx, parallel, train
from mos_jax._src.core.config import MoSConfig  # Hyper-parameters of an adapter.
from mos_jax._src.core.adapter import Adapter  # Trainable pools + static spec, one pytree.
from mos_jax._src.core.routing import AdapterSpec  # The static half of an Adapter (config, groups, index arrays).
from mos_jax._src.core.adapter import adapt  # A fresh Adapter for a params pytree.
from mos_jax._src.api import dry_run  # What adapting would match and create (an NNX model or params), allocating nothing.
from mos_jax._src.core.adapter import summary  # A per-group table of an adapter's parameters.
from mos_jax._src.core.assemble import assemble  # Every group's stacked factors A, B.
from mos_jax._src.core.assemble import merge  # Params with ΔW added to every adapted kernel.
from mos_jax._src.core.assemble import unmerge  # The inverse of merge.
from mos_jax._src.formats.native import save_adapter  # The native adapter file (pools, spec, config; checksummed).
from mos_jax._src.formats.native import load_adapter  # Reads it back.
from mos_jax._src.formats.peft import export_peft  # A PEFT LoRA folder PyTorch PEFT loads.
from mos_jax._src.errors import MismatchError  # Made for another model, config, spec or state layout.
from mos_jax._src.errors import CorruptError  # A file or checkpoint that cannot be read back as written.
from mos_jax._src.train.checkpoint import TrainCheckpointer  # Orbax checkpoints of a training state.

__version__ = "0.2.0"

__all__ = [
    "MoSConfig", "Adapter", "AdapterSpec", "adapt", "dry_run", "summary", "assemble", "merge", "unmerge",
    "save_adapter", "load_adapter", "export_peft", "MismatchError", "CorruptError", "TrainCheckpointer",
]
