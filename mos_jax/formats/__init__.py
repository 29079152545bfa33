"""Adapter files: the native MoS file (pools + routing + config) and PEFT LoRA export.

Merged HF Flax weights are written by :func:`mos_jax.hf.export_merged`.
"""

from mos_jax.formats._native import NATIVE_FORMAT, load_adapter, save_adapter
from mos_jax.formats._peft import (PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, NameRule, export_peft, load_peft_factors,
                                   verify_export)

__all__ = ["NATIVE_FORMAT", "load_adapter", "save_adapter", "PEFT_CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS",
           "NameRule", "export_peft", "load_peft_factors", "verify_export"]
