"""Glue for HF ``transformers`` Flax models: shapes without weights, layouts, generation, merged export.

Needs the ``transformers`` extra (``pip install mos_jax[hf]``); the rest of
``mos_jax`` does not import it. HF Flax models are linen models, so the linen
verbs apply (:mod:`mos_jax.linen`); ``kernel_layouts`` here is linen's with the
model's own dummy call.
"""

from mos_jax._src.hf import kernel_layouts  # linen.kernel_layouts of an HF Flax model (params default model.params).
from mos_jax._src.hf import param_shapes  # Shapes and dtypes of an HF Flax model's params, allocating none.
from mos_jax._src.hf import generate  # model.generate with an adapter injected into every decoding step.
from mos_jax._src.hf import export_merged  # W + ΔW as an HF Flax folder that from_pretrained loads.

__all__ = ["kernel_layouts", "param_shapes", "generate", "export_merged"]
