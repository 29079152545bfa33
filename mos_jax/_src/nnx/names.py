"""Names of Tunix models' layers: those MoS targets, and their PyTorch (HF ``transformers``) names for PEFT export."""

from __future__ import annotations

#: The attention and MLP projections of a Tunix Gemma 3 decoder block.
GEMMA3_TARGETS: tuple[str, ...] = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj")

_LAYER = r"layers/(\d+)"
_HF = r"model.layers.\1"

_LLAMA_STYLE = tuple(
    (rf"{_LAYER}/attn/{name}", (rf"{_HF}.self_attn.{name}",)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
) + tuple((rf"{_LAYER}/mlp/{name}", (rf"{_HF}.mlp.{name}",)) for name in ("gate_proj", "up_proj", "down_proj"))

#: ``names=`` rules of :func:`mos_jax.export_peft` for Tunix models, by family. Gemma 3's fused
#: ``kv_einsum`` (2, K, D, H) becomes ``k_proj`` and ``v_proj`` (its first free dim), sharing ``lora_A``.
PEFT_NAMES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "gemma3": (
        (rf"{_LAYER}/attn/q_einsum", (rf"{_HF}.self_attn.q_proj",)),
        (rf"{_LAYER}/attn/kv_einsum", (rf"{_HF}.self_attn.k_proj", rf"{_HF}.self_attn.v_proj")),
        (rf"{_LAYER}/attn/attn_vec_einsum", (rf"{_HF}.self_attn.o_proj",)),
    ) + tuple((rf"{_LAYER}/mlp/{name}", (rf"{_HF}.mlp.{name}",)) for name in ("gate_proj", "up_proj", "down_proj")),
    "llama3": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
}
