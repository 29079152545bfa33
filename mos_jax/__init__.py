"""mos_jax: Mixture of Shards (MoS) low-rank adapters for JAX/Flax models.

The root holds what most users need; the rest lives in themed subpackages:
``mos_jax.core`` (framework-free pieces), ``mos_jax.linen`` (linen backend,
multi-adapter serving, quantized bases), ``mos_jax.nnx`` (Flax NNX backend), ``mos_jax.formats`` (adapter files),
``mos_jax.train`` (step, checkpoints), ``mos_jax.parallel`` (meshes,
multi-host) and ``mos_jax.hf`` (HF ``transformers`` glue, optional extra).

Example:
  >>> import jax.numpy as jnp, optax, mos_jax
  >>> params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(4)}}
  >>> adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=4, equivalent_rank=1))
  >>> opt_state = optax.adam(1e-3).init(adapter)   # only the pools are leaves
  >>> merged = mos_jax.merge(params, adapter)
"""

from mos_jax import core, formats, linen, nnx, parallel, train
from mos_jax.core import Adapter, MoSConfig, adapt, assemble, dry_run, merge, summary, unmerge
from mos_jax.formats import export_peft, load_adapter, save_adapter
from mos_jax.linen import inject, make_train_step
from mos_jax.train import TrainCheckpointer

__version__ = "0.2.0"

__all__ = [
    "MoSConfig", "Adapter", "adapt", "summary", "dry_run", "assemble", "merge", "unmerge", "inject",
    "make_train_step", "save_adapter", "load_adapter", "export_peft", "TrainCheckpointer",
    "core", "linen", "nnx", "formats", "train", "parallel",
]
