"""Served generation checked row by row: a mixed batch through ``mos_jax.nnx.serve`` against each adapter alone.

Used by ``experiments/serve_gemma3.py`` (the real Gemma 3 270M) and its test (a tiny Tunix Gemma 3).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax


def random_adapters(model: Any, config: mos_jax.MoSConfig, count: int, scale: float) -> list[mos_jax.Adapter]:
  """``count`` adapters of ``config`` (one routing) for ``model``, each with its own random pools (std ``scale``).

  Pools are non-zero (``B`` is zero at initialisation, which would make every adapter the base model).
  """
  template = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(model, config))
  rng = np.random.default_rng(config.seed)
  return [template.replace(pools=jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), template.pools)) for _ in range(count)]


@dataclasses.dataclass
class RowCheck:
  """One row of a served batch against the same prompt run by its adapter alone (or the base model)."""

  row: int
  adapter: int
  prompt: str
  served: list[int]
  alone: list[int]
  base: list[int]

  @property
  def equal(self) -> bool:
    return self.served == self.alone

  @property
  def changed(self) -> bool:
    """The adapter's tokens differ from the base model's (so a row given the wrong adapter would show)."""
    return self.alone != self.base


def check_served_generation(model: Any, tokenizer: Any, adapters: Sequence[mos_jax.Adapter], prompts: Sequence[str],
                            adapter_ids: Sequence[int], cache_config: Any, **sampling: Any
                            ) -> tuple[list[RowCheck], dict[str, float]]:
  """Greedy tokens of a mixed batch served through ``mos_jax.nnx.serve`` against each adapter served alone.

  Three Tunix samplers: over ``adapt_multi(model, stack)`` (the mixed batch), over
  ``mos_jax.nnx.adapt(model, adapters[0])`` (each adapter in turn written in with
  ``load_pools``: the adapters must share one spec) and over the base model. The
  references run the whole batch (the same padding) and each row is compared with
  its own adapter's run.

  Args:
    model: a base Tunix NNX model (not adapted).
    tokenizer: what Tunix's ``Sampler`` takes (a SentencePiece processor, an HF tokenizer, ...).
    adapters: adapters of one spec for ``model``.
    prompts: one prompt per row.
    adapter_ids: one id per row in ``[-1, len(adapters))`` (``-1``: the base model).
    cache_config: Tunix's ``CacheConfig`` for the model.
    **sampling: the sampler's arguments (``max_generation_steps``, ``eos_tokens``, ...); greedy.

  Returns:
    ``(rows, seconds)``: one :class:`RowCheck` per row, and the wall seconds of each sampler's
    first call (compilation included) and second call.

  Raises:
    ValueError: adapters of different specs (``load_pools`` could not swap them), or bad ids.
  """
  from tunix.generate import sampler as sampler_lib  # noqa: PLC0415 - Tunix is an optional extra

  if any(a.spec != adapters[0].spec for a in adapters):
    raise ValueError("check_served_generation swaps adapters into one single-adapter model: give adapters of one "
                     "spec (one MoSConfig, seed included), e.g. from random_adapters.")
  ids = np.asarray(adapter_ids)
  seconds: dict[str, float] = {}

  def run(name: str, sampler: Any, call: Any) -> Any:
    t0 = time.perf_counter()
    out = call(sampler)
    seconds[name] = time.perf_counter() - t0
    return out

  def generate(sampler: Any) -> Any:
    return sampler(list(prompts), **sampling)

  served = sampler_lib.Sampler(mos_jax.nnx.adapt_multi(model, mos_jax.core.stack_adapters(list(adapters))),
                               tokenizer, cache_config)
  mixed = run("served", served, lambda s: mos_jax.nnx.serve(s, list(prompts), ids, **sampling))
  run("served again", served, lambda s: mos_jax.nnx.serve(s, list(prompts), ids, **sampling))
  base = run("base", sampler_lib.Sampler(model, tokenizer, cache_config), generate)
  single = sampler_lib.Sampler(mos_jax.nnx.adapt(model, adapters[0]), tokenizer, cache_config)
  alone = {}
  for k in sorted(set(ids.tolist()) - {-1}):
    mos_jax.nnx.load_pools(single.transformer, adapters[k])  # the sampler runs with these very variables
    alone[k] = run(f"adapter {k} alone", single, generate)
  rows = [RowCheck(row=b, adapter=int(k), prompt=prompts[b], served=[int(t) for t in mixed.tokens[b]],
                   alone=[int(t) for t in (base if k < 0 else alone[int(k)]).tokens[b]],
                   base=[int(t) for t in base.tokens[b]]) for b, k in enumerate(ids)]
  return rows, seconds
