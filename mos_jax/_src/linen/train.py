"""The training step of a linen model with an injected adapter."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mos_jax._src.linen.inject import adapted_loss
from mos_jax._src.train.step import make_step


def make_train_step(loss_fn: Callable[[Any, Any], jax.Array], optimizer: optax.GradientTransformation,
                    **shardings: Any) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """A jitted optax step that trains an :class:`~mos_jax.Adapter` on a linen model.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` that runs the linen model.
    optimizer: any optax transformation; ``optimizer.init(adapter)`` gives its
      state (the adapter's leaves are its pools).
    **shardings: ``trainable_sharding``, ``opt_state_sharding``,
      ``params_sharding``, ``batch_sharding`` for a sharded (pjit) step; see
      :func:`mos_jax.train.make_step`.

  Returns:
    ``step(adapter, opt_state, params, batch, dropout_rng) -> (adapter, opt_state, loss)``;
    ``dropout_rng`` may be ``None`` (no dropout).

  Example:
    >>> step = make_train_step(loss_fn, optax.adamw(1e-3))  # doctest: +SKIP
    >>> adapter, opt_state, loss = step(adapter, opt.init(adapter), params, batch, key)  # doctest: +SKIP
  """
  return make_step(adapted_loss(loss_fn), optimizer, **shardings)
