"""Text generation from a HF Flax causal LM with a MoS adapter, injected or merged."""

from __future__ import annotations

import contextlib
from typing import Any

import jax

from mos_jax._assemble import assemble
from mos_jax._inject import inject
from mos_jax._pools import Pools
from mos_jax._routing import Routing


def generate(model: Any, params: Any, input_ids: jax.Array, *, pools: Pools | None = None,
             routing: Routing | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, prng_key: jax.Array | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             pad_token_id: int | None = None, eos_token_id: int | None = None) -> jax.Array:
  """Greedy or sampled decoding with HF Flax ``generate`` (its KV cache), adapter injected.

  With ``pools`` and ``routing`` the factors are assembled once and the
  low-rank term is injected into every decoding step; without them the model
  runs on ``params`` as given (e.g. :func:`mos_jax.merge`-d params).

  Args:
    model: a ``transformers`` Flax causal LM (``FlaxLlamaForCausalLM``, ...).
    params: its (frozen base or merged) params.
    input_ids: ``(batch, prompt_len)`` prompt ids, left-padded when lengths differ.
    pools: the adapter's pools, or ``None``.
    routing: the adapter's routing, with ``pools``.
    attention_mask: ``(batch, prompt_len)``; 0 marks left padding.
    max_new_tokens: tokens to generate after the prompt.
    do_sample: sample instead of greedy decoding; needs ``prng_key``.
    prng_key: key for sampling.
    temperature: sampling temperature.
    top_k: sample from the ``top_k`` most likely tokens.
    top_p: nucleus sampling mass.
    pad_token_id: id written after a sequence has ended.
    eos_token_id: id that ends a sequence.

  Returns:
    ``(batch, prompt_len + max_new_tokens)`` token ids.

  Example:
    >>> out = generate(model, params, ids, pools=pools, routing=routing, max_new_tokens=8)  # doctest: +SKIP
  """
  if (pools is None) != (routing is None):
    raise ValueError("Pass both pools and routing (injected adapter) or neither (plain / merged params).")
  if do_sample and prng_key is None:
    raise ValueError("do_sample=True needs prng_key.")
  ctx = inject(assemble(pools, routing), routing) if pools is not None else contextlib.nullcontext()
  gen = model.generation_config
  eos_token_id = eos_token_id if eos_token_id is not None else gen.eos_token_id
  if pad_token_id is None:
    # HF Flax decoding needs a pad id to write after EOS; reuse EOS (or 0) as tokenizers do.
    pad_token_id = next((t for t in (gen.pad_token_id, eos_token_id, 0) if t is not None))
  kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, prng_key=prng_key,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id)
  if do_sample:
    kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
  # HF Flax models broadcast implicitly; keep that local to the model.
  with ctx, jax.numpy_rank_promotion("allow"):
    return model.generate(input_ids, attention_mask=attention_mask, params=params, **kwargs).sequences
