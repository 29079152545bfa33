"""qwix's own LoRA / QLoRA on a Tunix Gemma 3: the baseline the Gemma 3 benchmarks compare MoS with.

:func:`qwix_lora` applies ``qwix.LoraProvider`` to the six projections MoS adapts
(:data:`QWIX_TARGETS`) and splits the result for a training step, the LoRA parameters apart.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

#: The six projections MoS adapts on Gemma 3, as one qwix ``module_path`` regex (qwix LoRA / QLoRA baselines).
QWIX_TARGETS = r".*/(q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)"


def qwix_lora(model: Any, batch: dict[str, jax.Array], **rule: Any) -> tuple[Any, Any, Any]:
  """qwix's own LoRA (``LoraProvider(module_path=QWIX_TARGETS, **rule)``) on a Tunix Gemma 3, split for a step.

  Args:
    model: a Tunix ``Gemma3`` (not adapted).
    batch: ``{"tokens", "positions", "mask"}`` model inputs qwix traces the model with
      (:func:`experiments.lib.lm_eval.random_batch`).
    **rule: the provider's settings (``rank``, ``alpha``, ``weight_qtype``, ...).

  Returns:
    ``(graphdef, lora, rest)``: ``nnx.split(model, nnx.LoRAParam, ...)`` of the qwix-adapted model.

  Example:
    >>> graphdef, lora, rest = qwix_lora(model, random_batch(262_144, 8, 64), rank=8, alpha=16.0)  # doctest: +SKIP
  """
  import qwix  # noqa: PLC0415

  provider = qwix.LoraProvider(module_path=QWIX_TARGETS, **rule)
  with jax.numpy_rank_promotion("allow"):  # Tunix's models broadcast implicitly
    lora_model = qwix.apply_lora_to_model(model, provider, batch["tokens"], batch["positions"], None, batch["mask"],
                                          rngs=nnx.Rngs(0))
  return nnx.split(lora_model, nnx.LoRAParam, ...)
