"""Training helpers: only the pools are differentiated."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mos_jax._assemble import assemble
from mos_jax._inject import inject
from mos_jax._pools import Pools
from mos_jax._routing import Routing

LossFn = Callable[[Any, Any], jax.Array]


def adapted_loss(loss_fn: LossFn, routing: Routing) -> Callable[..., jax.Array]:
  """Turns a base-model loss into a loss of the pools.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` that runs the linen model.
    routing: the adapter's routing.

  Returns:
    ``f(pools, params, batch, dropout_rng=None) -> scalar``: ``loss_fn`` with
    the factors assembled from ``pools`` injected into the model.

  Example:
    >>> f = adapted_loss(loss_fn, adapter.routing)  # doctest: +SKIP
    >>> loss, grads = jax.value_and_grad(f)(adapter.pools, params, batch)  # doctest: +SKIP
  """
  def f(pools: Pools, params: Any, batch: Any, dropout_rng: jax.Array | None = None) -> jax.Array:
    with inject(assemble(pools, routing), routing, dropout_rng=dropout_rng):
      return loss_fn(params, batch)
  return f


def make_train_step(loss_fn: LossFn, routing: Routing, optimizer: optax.GradientTransformation,
                    ) -> Callable[..., tuple[Pools, Any, jax.Array]]:
  """A jitted optax step over the pools; base params are a constant input.

  The base params are passed but never differentiated, so they get neither
  gradients nor optimizer state. Pools and optimizer state are donated.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    routing: the adapter's routing.
    optimizer: any optax transformation; initialise it on the pools.

  Returns:
    ``step(pools, opt_state, params, batch, dropout_rng) -> (pools, opt_state, loss)``.

  Example:
    >>> opt = optax.adamw(1e-3)
    >>> opt_state = opt.init(adapter.pools)  # doctest: +SKIP
    >>> step = make_train_step(loss_fn, adapter.routing, opt)  # doctest: +SKIP
    >>> pools, opt_state, loss = step(adapter.pools, opt_state, params, batch, key)  # doctest: +SKIP
  """
  grad_fn = jax.value_and_grad(adapted_loss(loss_fn, routing))

  def step(pools, opt_state, params, batch, dropout_rng):
    loss, grads = grad_fn(pools, params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, opt_state, pools)
    return optax.apply_updates(pools, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))
