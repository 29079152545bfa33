"""Text continuations of a Tunix NNX model (Gemma 3 270M, adapted or not) through Tunix's ``Sampler``.

:func:`make_sampler` builds ``tunix.generate.sampler.Sampler`` over a model with a Tunix
config (``num_layers``, ``num_kv_heads``, ``head_dim``) and a
:class:`~experiments.lib.gemma3_tokenizer.Tokenizer`; :func:`generate` runs it: one prefill of the
left-padded prompts, then KV-cache decoding, greedy or sampled, each row stopping at its first stop
token. A sampler compiles its prefill and decoding once per padded batch shape and temperature, and reads the
model's variables at each call, so pools written in place afterwards (``mos_jax.nnx.load_pools``)
are used without rebuilding it. For many adapters in one batch, make the sampler over
``mos_jax.nnx.adapt_multi(...)`` and generate through ``mos_jax.nnx.serve``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

#: The KV cache length of :func:`make_sampler`: the prompts, padded to a power of 2, plus the new tokens.
DEFAULT_CACHE_SIZE = 256


def needed_cache_size(tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> int:
  """The KV cache length that generating ``max_new_tokens`` after ``prompts`` needs.

  The sampler left-pads the prompts (``<bos>`` included) to the next power of 2 of the longest.

  Example:
    >>> sampler = make_sampler(model, tokenizer, needed_cache_size(tokenizer, prompts, 8))  # doctest: +SKIP
  """
  from tunix.generate import utils as sampler_utils  # noqa: PLC0415

  longest = max((len(tokenizer.encode(p, bos=True)) for p in prompts), default=1)
  return int(sampler_utils.next_power_of_2(longest)) + int(max_new_tokens)


def make_sampler(model: Any, tokenizer: Any, cache_size: int = DEFAULT_CACHE_SIZE) -> Any:
  """Tunix's ``Sampler`` over ``model``, its KV cache sized from the model's Tunix config.

  Args:
    model: a Tunix NNX model (``Gemma3``, or one adapted by ``mos_jax.nnx.adapt``) with a ``config``
      that has ``num_layers``, ``num_kv_heads`` and ``head_dim``.
    tokenizer: a :class:`~experiments.lib.gemma3_tokenizer.Tokenizer` (its SentencePiece processor
      is what the sampler uses).
    cache_size: the KV cache length: at least the longest prompt (``<bos>`` included) rounded up to a
      power of 2, plus the new tokens (:func:`needed_cache_size`).

  Returns:
    The ``tunix.generate.sampler.Sampler``.

  Raises:
    ValueError: the model has no such config, or ``cache_size`` < 2.

  Example:
    >>> sampler = make_sampler(model, tokenizer)  # doctest: +SKIP
    >>> generate(sampler, tokenizer, ["The capital of France is"], 4).text  # doctest: +SKIP
    [' Paris.\\n\\n']
  """
  from tunix.generate import sampler as sampler_lib  # noqa: PLC0415

  return sampler_lib.Sampler(model, tokenizer.sp, cache_config(model, cache_size))


def cache_config(model: Any, cache_size: int) -> Any:
  """Tunix's ``CacheConfig`` of ``cache_size`` positions for ``model``, its shape read from the model's config.

  Args:
    model: a Tunix NNX model (adapted or not) whose ``config`` has ``num_layers``, ``num_kv_heads`` and
      ``head_dim``.
    cache_size: the KV cache length (:func:`needed_cache_size`).

  Returns:
    The ``tunix.generate.sampler.CacheConfig``.

  Raises:
    ValueError: the model has no such config, or ``cache_size`` < 2.

  Example:
    >>> cache_config(model, needed_cache_size(tokenizer, ["Hi"], 4))  # doctest: +SKIP
  """
  from tunix.generate import sampler as sampler_lib  # noqa: PLC0415

  cfg = getattr(model, "config", None)
  missing = [a for a in ("num_layers", "num_kv_heads", "head_dim") if not hasattr(cfg, a)]
  if missing:
    raise ValueError(f"A sampler's KV cache needs a Tunix model whose `config` has num_layers, num_kv_heads and "
                     f"head_dim; "
                     f"{type(model).__name__}'s config {type(cfg).__name__} lacks {missing}. Fix: pass a Tunix model "
                     "(e.g. from experiments.lib.gemma3_weights.load_gemma3_270m), adapted or not.")
  if cache_size < 2:
    raise ValueError(f"cache_size={cache_size} holds no prompt and new token: pass at least the longest prompt "
                     "rounded up to a power of 2 plus the new tokens.")
  return sampler_lib.CacheConfig(cache_size=int(cache_size), num_layers=cfg.num_layers,
                                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)


def generate(sampler: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, *,
             temperature: float = 0.0, key: jax.Array | None = None) -> Any:
  """Continues a batch of prompts through ``sampler`` (the new tokens only, without the prompts).

  ``<bos>`` is prepended to each prompt; the prompts are left-padded to a power of 2 (the
  attention mask hides the padding and positions start at 0 at each ``<bos>``, so a row does not
  depend on the others). Each row stops at its first stop token (``tokenizer.stop_ids``:
  ``<eos>``, ``<end_of_turn>``), which is not part of its tokens or text.

  Args:
    sampler: from :func:`make_sampler`.
    tokenizer: the :class:`~experiments.lib.gemma3_tokenizer.Tokenizer` the sampler was made with.
    prompts: the prompts.
    max_new_tokens: the most tokens generated per prompt (at least 1).
    temperature: 0 for greedy decoding (argmax), else sampling from ``softmax(logits / temperature)``
      over the whole vocabulary.
    key: the PRNG key of the sampling; ``None`` for ``jax.random.key(0)``. Unused when greedy.

  Returns:
    The sampler's ``SamplerOutput``: ``.text`` (one string per prompt) and ``.tokens`` (one array of
    new token ids per prompt).

  Raises:
    ValueError: no prompts, ``max_new_tokens`` < 1, a negative temperature, or prompts and new tokens
      that do not fit the sampler's KV cache (the message gives the ``cache_size`` that fits).

  Example:
    >>> out = generate(sampler, tokenizer, ["Once upon a time,"], 8, temperature=0.7, key=jax.random.key(3))
    ... # doctest: +SKIP
    >>> out.text  # doctest: +SKIP
  """
  prompts = list(prompts)
  if not prompts or max_new_tokens < 1 or temperature < 0:
    raise ValueError(f"generate needs at least one prompt, max_new_tokens >= 1 and temperature >= 0; got "
                     f"{len(prompts)} prompts, max_new_tokens={max_new_tokens}, temperature={temperature}.")
  needed, held = needed_cache_size(tokenizer, prompts, max_new_tokens), sampler.cache_config.cache_size
  if needed > held:
    raise ValueError(f"These prompts (padded to {needed - max_new_tokens} tokens) and {max_new_tokens} new tokens "
                     f"need a KV cache of {needed}, and this sampler's holds {held}. Fix: "
                     f"make_sampler(model, tokenizer, cache_size={needed}) (needed_cache_size gives it), or "
                     "shorten the prompts.")
  # Tunix samples only in its top-p mode (a bare temperature decodes greedily); top_p=1 keeps the whole
  # vocabulary, i.e. plain softmax(logits / temperature).
  sampling = {} if temperature == 0 else {"temperature": float(temperature), "top_p": 1.0,
                                          "seed": jax.random.key(0) if key is None else key}
  return sampler(prompts, max_generation_steps=int(max_new_tokens), eos_tokens=list(tokenizer.stop_ids), **sampling)
