"""Training: only the pools are differentiated; optax steps learn; one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mos_jax import MoSConfig, adapt
from mos_jax.linen import adapted_loss, make_train_step
from oracles.helpers import hf_numerics

BATCH = {"ids": jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 9)), jnp.int32)}


def lm_loss(model):
  def loss_fn(params, batch):
    with hf_numerics():
      logits = model(batch["ids"][:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()
  return loss_fn


@pytest.fixture(scope="module")
def setup(tiny_llama):
  adapter = adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, dropout=0.1))
  return tiny_llama, adapter


def test_step0_gradients(setup):
  model, adapter = setup
  f = adapted_loss(lm_loss(model))
  grads = jax.jit(jax.grad(f))(adapter, model.params, BATCH, jax.random.key(0))  # eager: ~50 s
  # The gradient is an Adapter (same static routing) whose leaves are the pools' gradients.
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
  assert jax.tree_util.tree_structure(grads.pools) == jax.tree_util.tree_structure(adapter.pools)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
  for name, g in grads.pools.items():
    assert float(jnp.abs(g["B"]).max()) > 0, name  # B = 0 still gets gradient
    assert not jnp.any(g["A"]), name  # ... while A's gradient is exactly zero through B = 0


def test_base_params_are_constant_inputs(setup):
  """The base enters as a non-differentiated argument: its tangent is exactly zero."""
  model, adapter = setup
  f = adapted_loss(lm_loss(model))
  jaxpr = jax.make_jaxpr(jax.grad(f))(adapter, model.params, BATCH)
  # Outputs of the gradient are pools-shaped only; no base-param-shaped cotangent exists.
  out_shapes = [tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars]
  assert out_shapes == [tuple(x.shape) for x in jax.tree_util.tree_leaves(adapter.pools)]


def test_optax_steps_learn_without_recompiling(setup):
  model, adapter = setup
  optimizer = optax.adamw(1e-2)
  trained = adapter.replace(pools=jax.tree_util.tree_map(jnp.copy, adapter.pools))  # the step donates it
  opt_state = optimizer.init(trained)
  base_before = jax.tree_util.tree_map(np.asarray, model.params)
  step = make_train_step(lm_loss(model), optimizer)
  compiles = []

  def on_event(event, *args, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  losses = []
  key = jax.random.key(0)
  for i in range(12):
    trained, opt_state, loss = step(trained, opt_state, model.params, BATCH, jax.random.fold_in(key, i))
    losses.append(float(loss))
    if i == 0:
      compiles.clear()
  jax.monitoring.unregister_event_duration_listener(on_event)
  assert compiles == [], f"recompiled {len(compiles)} times after the first step"
  assert losses[-1] < losses[0] - 0.1, losses
  assert type(trained) is type(adapter) and trained.spec == adapter.spec
  # Optimizer state covers only the pools: AdamW's mu has the adapter's structure (its leaves are the pools).
  mu = opt_state[0].mu
  assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(trained)
  assert [x.shape for x in jax.tree_util.tree_leaves(mu)] == [x.shape for x in jax.tree_util.tree_leaves(adapter.pools)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, model.params),
                         base_before)
