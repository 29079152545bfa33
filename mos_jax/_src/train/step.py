"""The one training step: an optax update of the trainable pytree, the frozen base a constant input."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

#: ``loss_fn(trainable, params, batch, rng) -> scalar``.
TrainableLoss = Callable[[Any, Any, Any, Any], jax.Array]


def make_step(loss_fn: TrainableLoss, optimizer: optax.GradientTransformation, *,
              trainable_sharding: Any = None, opt_state_sharding: Any = None, params_sharding: Any = None,
              batch_sharding: Any = None, donate: bool = True) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """A jitted optax step over any trainable pytree (an :class:`~mos_jax.Adapter`, or one with a head).

  Only ``trainable`` is differentiated: the base params are passed in but get
  neither gradients nor optimizer state. With shardings (all four, e.g. from
  :mod:`mos_jax.parallel`), the step is compiled with explicit in/out shardings
  (pjit) over their mesh; without, it runs where its inputs are. The trainable
  state and optimizer state are donated.

  Args:
    loss_fn: ``loss_fn(trainable, params, batch, rng) -> scalar`` (``rng`` for
      dropout, may be ``None``).
    optimizer: any optax transformation; initialise it on the trainable pytree.
    trainable_sharding: shardings of ``trainable`` (a pytree prefix of it).
    opt_state_sharding: shardings of the optimizer state.
    params_sharding: shardings of the frozen base params.
    batch_sharding: shardings of the batch.
    donate: donate ``trainable`` and the optimizer state.

  Returns:
    ``step(trainable, opt_state, params, batch, rng) -> (trainable, opt_state, loss)``.

  Example:
    >>> step = make_step(lambda t, p, b, r: ((t["w"] - b) ** 2).sum(), optax.sgd(0.1))
    >>> t, s, loss = step({"w": jnp.ones(2)}, optax.sgd(0.1).init({"w": jnp.ones(2)}), None, jnp.zeros(2), None)  # doctest: +SKIP
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def step(trainable, opt_state, params, batch, rng):
    loss, grads = grad_fn(trainable, params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  donated = (0, 1) if donate else ()
  shardings = (trainable_sharding, opt_state_sharding, params_sharding, batch_sharding)
  if all(s is None for s in shardings):
    return jax.jit(step, donate_argnums=donated)
  if any(s is None for s in shardings):
    raise ValueError("Pass all four shardings (trainable, opt_state, params, batch) or none.")
  mesh = next(s.mesh for s in jax.tree_util.tree_leaves(shardings) if hasattr(s, "mesh"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=donated,
                 in_shardings=(trainable_sharding, opt_state_sharding, params_sharding, batch_sharding, replicated),
                 out_shardings=(trainable_sharding, opt_state_sharding, replicated))
