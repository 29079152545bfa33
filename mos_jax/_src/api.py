"""The root's backend-neutral verbs that take either backend's model: dispatched by type."""

from __future__ import annotations

from typing import Any

from flax import nnx

from mos_jax._src.core.adapter import dry_run as params_dry_run
from mos_jax._src.core.config import MoSConfig
from mos_jax._src.nnx.adapt import dry_run as nnx_dry_run


def dry_run(model_or_params: Any, config: MoSConfig, **kwargs: Any) -> str:
  """Lists what adapting would match and create, allocating nothing: for an NNX model or a params pytree.

  An ``nnx.Module`` goes to :func:`mos_jax.nnx.dry_run` (what ``mos_jax.nnx.adapt``
  would wrap); anything else is a params pytree (linen, HF Flax, NNX pure dict) for
  :func:`mos_jax.core.dry_run` (``layouts=`` as in :func:`mos_jax.adapt`).

  Example:
    >>> print(mos_jax.dry_run(gemma, mos_jax.MoSConfig(rank=8, equivalent_rank=1)))  # doctest: +SKIP
  """
  if isinstance(model_or_params, nnx.Module):
    return nnx_dry_run(model_or_params, config, **kwargs)
  return params_dry_run(model_or_params, config, **kwargs)
