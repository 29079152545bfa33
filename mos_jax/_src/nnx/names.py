"""Names of Tunix models' layers: those MoS targets, and their PyTorch (HF ``transformers``) names for PEFT export."""

from __future__ import annotations

from typing import Any

from mos_jax._src.core.config import LLAMA_TARGETS

#: The attention and MLP projections of a Tunix Gemma 3 decoder block.
GEMMA3_TARGETS: tuple[str, ...] = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj")

#: ``adapt``'s targets by Tunix model family, used when ``MoSConfig.target_modules`` is left at its default
#: (those present in the model: Gemma 3 with as many KV heads as query heads has one ``qkv_einsum``).
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "gemma3": GEMMA3_TARGETS + ("qkv_einsum",),
    "gemma": GEMMA3_TARGETS + ("qkv_einsum",),
    "llama3": LLAMA_TARGETS,
    "qwen3": LLAMA_TARGETS,
}

#: Fused projections that ``adapt`` splits by default into their parts, each its own module type with
#: its own pools (as the paper and HF adapt ``k_proj`` and ``v_proj``): ``{module name: parts along the
#: kernel's first axis}``. Gemma's ``kv_einsum`` kernel is ``(2, K, D, H)``.
FUSED: dict[str, tuple[str, ...]] = {"kv_einsum": ("k", "v"), "qkv_einsum": ("q", "k", "v")}


def family(model: Any) -> str | None:
  """The Tunix model family of a model (``"gemma3"``, ``"llama3"``, ...), from its class's module; else ``None``."""
  for cls in type(model).__mro__:  # a subclass made by a wrapper (qwix, the call check) keeps the family's base
    parts = cls.__module__.split(".")
    if parts[:2] == ["tunix", "models"] and len(parts) > 2:
      return parts[2]
  return None

_LAYER = r"layers/(\d+)"
_HF = r"model.layers.\1"

_LLAMA_STYLE = tuple(
    (rf"{_LAYER}/attn/{name}", (rf"{_HF}.self_attn.{name}",)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
) + tuple((rf"{_LAYER}/mlp/{name}", (rf"{_HF}.mlp.{name}",)) for name in ("gate_proj", "up_proj", "down_proj"))

#: ``names=`` rules of :func:`mos_jax.export_peft` for Tunix models, by family. Gemma 3's ``kv_einsum``
#: split (the default) gives ``kv_einsum/k`` and ``kv_einsum/v``, each its own ``k_proj``/``v_proj`` with
#: its own ``lora_A``; adapted fused (``split_fused={}``), its (2, K, D, H) kernel becomes ``k_proj`` and
#: ``v_proj`` (its first free dim) sharing one ``lora_A``.
PEFT_NAMES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "gemma3": (
        (rf"{_LAYER}/attn/q_einsum", (rf"{_HF}.self_attn.q_proj",)),
        (rf"{_LAYER}/attn/kv_einsum/k", (rf"{_HF}.self_attn.k_proj",)),
        (rf"{_LAYER}/attn/kv_einsum/v", (rf"{_HF}.self_attn.v_proj",)),
        (rf"{_LAYER}/attn/kv_einsum", (rf"{_HF}.self_attn.k_proj", rf"{_HF}.self_attn.v_proj")),
        (rf"{_LAYER}/attn/attn_vec_einsum", (rf"{_HF}.self_attn.o_proj",)),
    ) + tuple((rf"{_LAYER}/mlp/{name}", (rf"{_HF}.mlp.{name}",)) for name in ("gate_proj", "up_proj", "down_proj")),
    "llama3": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
}
