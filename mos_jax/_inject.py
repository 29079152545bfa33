"""Injecting the low-rank term into a Flax linen model's dense layers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax._assemble import Factors
from mos_jax._routing import Routing


def low_rank_term(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale · (x @ Aᵀ) @ Bᵀ`` without forming ``ΔW``; ``A: (r, d_in)``, ``B: (d_out, r)``."""
  h = jnp.einsum("...i,ri->...r", x, a)
  return scale * jnp.einsum("...r,or->...o", h, b)


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


@contextlib.contextmanager
def inject(factors: Factors, routing: Routing, *,
           dropout_rng: jax.Array | None = None) -> Iterator[None]:
  """Adds ``(α/r)·(dropout(x) @ A_iᵀ) @ B_iᵀ`` to every targeted ``nn.Dense`` call.

  Uses ``nn.intercept_methods``: a linen module's path equals its params path,
  so each adapted ``nn.Dense`` is found by its module path. Works with
  ``transformers`` Flax models (which call ``module.apply`` inside) and under
  ``jax.jit`` as long as the model is called (traced) inside the ``with``.
  The input is cast to the factors' dtype and the term back to the layer's.

  Args:
    factors: output of :func:`mos_jax.assemble`.
    routing: the adapter's routing.
    dropout_rng: key for the adapter-input dropout; ``None`` disables dropout
      (evaluation). Each layer folds in its own index.

  Yields:
    Nothing; models called inside the block are adapted.

  Example:
    >>> with inject(assemble(pools, routing), routing):  # doctest: +SKIP
    ...   logits = model(input_ids, params=params).logits
  """
  stacked = [g.name for g in routing.groups if g.stacked]
  if stacked:
    raise NotImplementedError(
        f"Groups {stacked} are stacked (nn.scan) kernels: their layer index is a traced loop "
        "variable, so the low-rank term cannot be injected per layer. Use mos_jax.merge for "
        "these models, or unroll the scan.")
  config = routing.config
  lookup = routing.layer_of
  ordinal = {path: n for n, path in enumerate(sorted(lookup))}
  use_dropout = dropout_rng is not None and config.dropout > 0.0

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    hit = lookup.get(path)
    if hit is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    name, i = hit
    a, b = factors[name]["A"][i], factors[name]["B"][i]
    x = (args[0] if args else kwargs["inputs"]).astype(a.dtype)
    if use_dropout:
      x = _dropout(x, config.dropout, jax.random.fold_in(dropout_rng, ordinal[path]))
    return y + low_rank_term(x, a, b, config.scale).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield
