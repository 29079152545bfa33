"""Files: the native MoS adapter file, PEFT LoRA export, and the atomic write they are made with.

Merged HF Flax weights are written by :func:`mos_jax.hf.export_merged`.
"""

from mos_jax._src.formats.native import save_adapter  # Pools, spec and config in one checksummed safetensors file.
from mos_jax._src.formats.native import load_adapter  # Reads it back (optionally checked against base params).
from mos_jax._src.formats.peft import export_peft  # A PEFT LoRA folder (adapter_config.json + safetensors).
from mos_jax._src.formats.peft import verify_export  # Checks an export folder against its manifest.
from mos_jax._src.formats.peft import load_peft_factors  # Reads a PEFT LoRA folder's factors and their one scale.
from mos_jax._src.formats.peft import load_peft  # Reads a PEFT LoRA folder module by module (factors, own scale).
from mos_jax._src.formats.peft import PeftModule  # One module of a PEFT folder: a, b and PEFT's scale.
from mos_jax._src.formats.peft import NameRule  # A (regex, PEFT module names) rule of export_peft's names=.
from mos_jax._src.io.files import atomic_file  # Writes a file through a temp file and a rename: never a half file.
from mos_jax._src.errors import LockedError  # Another process is writing the same export folder or checkpoint.

__all__ = ["save_adapter", "load_adapter", "export_peft", "verify_export", "load_peft_factors", "load_peft",
           "PeftModule", "NameRule", "atomic_file", "LockedError"]
