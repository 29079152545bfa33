"""The low-rank term's hand-written backward pass (``low_rank_term``'s ``custom_vjp``).

Oracles, none of which runs the code under test: the closed-form gradients in float64 NumPy; the
plain formula ``scale · (x Aᵀ) Bᵀ`` differentiated by JAX; and, through every backend (linen
per-layer and ``nn.scan``, NNX per-layer and ``nnx.scan``), the pool gradients of the merged model
``W + scale · Aᵀ Bᵀ``, which never calls the low-rank term.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mos_jax
from oracles.helpers import random_pools

D_IN, D_OUT, R = 16, 24, 3


def plain_term(x, a, b, scale):
  """The formula the custom VJP replaces, differentiated by JAX."""
  return scale * jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b)


#: Ranks on both sides of the term's FUSED_RANK_MAX (8): h·Bᵀ as fused multiply-adds, and as a matmul.
RANKS = (R, 24)


def arrays(seed=0, lead=(2, 5), r=R):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(*lead, D_IN)), rng.normal(size=(r, D_IN)), rng.normal(size=(D_OUT, r)),
          rng.normal(size=(*lead, D_OUT)))


def numpy_gradients(x, a, b, g, s):
  """``y = s·x Aᵀ Bᵀ`` and the cotangents of x, A, B, s for the output cotangent g, in float64."""
  x2, g2 = x.reshape(-1, D_IN), g.reshape(-1, D_OUT)
  h = x2 @ a.T
  y = s * h @ b.T
  gb = g2 @ b
  return (y.reshape(*x.shape[:-1], D_OUT), (s * gb @ a).reshape(x.shape), s * gb.T @ x2, s * g2.T @ h,
          float(np.sum(g2 * (h @ b.T))))


def rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@pytest.mark.parametrize("scale", [0.7, "array"])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("r", RANKS)
def test_term_and_all_four_gradients_match_numpy(scale, lead, r):
  x, a, b, g = arrays(lead=lead, r=r)
  s = 0.7 if scale == 0.7 else jnp.float32(0.7)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, *(jnp.asarray(t, jnp.float32) for t in (x, a, b)), s)
  grads = vjp(jnp.asarray(g, jnp.float32))
  want = numpy_gradients(x, a, b, g, 0.7)
  assert rel(y, want[0]) < 1e-5
  for got, ref, name in zip(grads, want[1:], ("x", "A", "B", "scale")):
    assert np.shape(got) == np.shape(ref), name
    assert rel(got, ref) < 1e-5, name


@pytest.mark.parametrize("r", RANKS)
def test_equals_the_plain_formula_under_jit_vmap_and_scan(r):
  x, a, b, _ = arrays(seed=1, r=r)
  x, a, b = (jnp.asarray(t, jnp.float32) for t in (x, a, b))
  stack_a, stack_b = jnp.stack([a, 2 * a, -a]), jnp.stack([b, b / 3, 2 * b])

  def loss(term, stack_a, stack_b, x):
    def layer(h, ab):
      return jnp.tanh(h[..., :D_IN] + term(h[..., :D_IN], ab[0], ab[1], 0.5)[..., :D_IN]), None
    rows = jax.vmap(lambda row: jax.lax.scan(layer, row, (stack_a, stack_b))[0])(x)
    return (rows ** 2).sum()

  args = (stack_a, stack_b, x)
  got = jax.jit(jax.value_and_grad(lambda *t: loss(mos_jax.core.low_rank_term, *t), argnums=(0, 1, 2)))(*args)
  want = jax.value_and_grad(lambda *t: loss(plain_term, *t), argnums=(0, 1, 2))(*args)
  assert rel(got[0], want[0]) < 1e-5
  for g, w in zip(got[1], want[1]):
    assert rel(g, w) < 1e-5


@pytest.mark.parametrize("x_dtype,f_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                             (jnp.float32, jnp.float32)])
@pytest.mark.parametrize("r", RANKS)
def test_dtypes_are_those_of_the_plain_formula(x_dtype, f_dtype, r):
  x, a, b, _ = arrays(seed=2, r=r)
  x, a, b = jnp.asarray(x, x_dtype), jnp.asarray(a, f_dtype), jnp.asarray(b, f_dtype)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, x, a, b, 0.5)
  assert y.dtype == plain_term(x, a, b, 0.5).dtype
  dx, da, db, _ = vjp(jnp.ones_like(y))
  assert (dx.dtype, da.dtype, db.dtype) == (x.dtype, a.dtype, b.dtype)
  _, plain_vjp = jax.vjp(plain_term, x, a, b, 0.5)
  tol = 2e-2 if jnp.bfloat16 in (x_dtype, f_dtype) else 1e-5
  for got, want in zip((dx, da, db), plain_vjp(jnp.ones_like(y))[:3]):
    assert rel(got, want) < tol


def test_the_fused_form_accumulates_bfloat16_in_float32():
  x, a, b, _ = (jnp.asarray(t, jnp.bfloat16) for t in arrays(seed=4))
  h = jnp.einsum("...i,ri->...r", x, a)  # the bfloat16 intermediate both compute first
  want = (h.astype(jnp.float32) @ b.T.astype(jnp.float32)).astype(jnp.bfloat16)
  got = mos_jax.core.low_rank_term(x, a, b, 1.0)
  assert got.dtype == jnp.bfloat16
  # Within one bfloat16 rounding of the float32-accumulated value (bfloat16 accumulation of r = 3
  # products would be off by up to ~3 roundings).
  assert rel(got, want) <= 2.0 ** -8


def test_the_dense_weight_gradient_is_never_formed():
  """The backward pass has only rank-r products: no (d_in, d_out) array appears in its HLO."""
  x, a, b, g = (jnp.asarray(t, jnp.float32) for t in arrays(seed=3, lead=(64,)))
  hlo = jax.jit(lambda x, a, b, g: jax.vjp(mos_jax.core.low_rank_term, x, a, b, 2.0)[1](g)).lower(
      x, a, b, g).as_text()
  assert f"{D_IN}x{D_OUT}" not in hlo and f"{D_OUT}x{D_IN}" not in hlo


# ------------------------------------------------------------------------- backends


L = 3
NAMES = ("q", "up", "down")


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(nn.Dense(D_OUT, name="up")(nn.Dense(D_IN, name="q")(x)))
    return x + nn.Dense(D_IN, name="down")(h), None


class LinenLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x = LinenBlock(name=str(i))(x, None)[0]
    return x


class LinenUnrolled(nn.Module):
  """Params under ``layers/<i>/...``: one group per projection, over the layers."""

  @nn.compact
  def __call__(self, x):
    return LinenLayers(name="layers")(x)


class LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
    return stack(name="layers")(x, None)[0]


def small_pools(adapter, seed=2):
  # B included: with B = 0 the gradients of A vanish and would compare trivially.
  return adapter.replace(pools=jax.tree_util.tree_map(lambda p: 0.05 * p, random_pools(adapter.pools, seed=seed)))


def assert_pool_grads_close(got, want):
  for name in want.pools:
    for f in ("A", "B"):
      w = np.asarray(want.pools[name][f])
      assert np.abs(w).max() > 0, (name, f)
      assert rel(got.pools[name][f], w) < 1e-5, (name, f)


@pytest.mark.parametrize("scanned", [False, True])
def test_linen_pool_gradients_equal_the_merged_models(scanned):
  x = jax.random.normal(jax.random.key(0), (2, 5, D_IN))
  model = LinenScanned() if scanned else LinenUnrolled()
  params = model.init(jax.random.key(1), x)["params"]
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=NAMES)
  if scanned:
    config = dataclasses.replace(config, stacked_modules=NAMES, layer_axis=0)
  adapter = small_pools(mos_jax.adapt(params, config))

  def loss(p):
    return (jnp.sin(model.apply({"params": p}, x)) ** 2).sum()

  injected = jax.grad(mos_jax.linen.adapted_loss(lambda p, _: loss(p)))(adapter, params, None)
  merged = jax.grad(lambda ad: loss(mos_jax.merge(params, ad)))(adapter)
  assert_pool_grads_close(injected, merged)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(D_IN, D_IN, rngs=rngs)
    self.up = nnx.Linear(D_IN, D_OUT, rngs=rngs)
    self.down = nnx.Linear(D_OUT, D_IN, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.q(x))))


class NNXUnrolled(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([NNXBlock(rngs) for _ in range(L)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class NNXScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.layers)


@pytest.mark.parametrize("scanned", [False, True])
def test_nnx_pool_gradients_equal_the_merged_models(scanned):
  x = jax.random.normal(jax.random.key(0), (2, 5, D_IN))
  model = NNXScanned(nnx.Rngs(0)) if scanned else NNXUnrolled(nnx.Rngs(0))
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=NAMES)
  if scanned:
    config = dataclasses.replace(config, stacked_modules=NAMES, layer_axis=0)
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, config))
  adapter = small_pools(adapter)

  def loss(m):
    return (jnp.sin(m(x)) ** 2).sum()

  injected = jax.grad(lambda ad: loss(mos_jax.nnx.bind(graphdef, ad, state)))(adapter)
  merged = jax.grad(lambda ad: loss(mos_jax.nnx.merge(mos_jax.nnx.bind(graphdef, ad, state))))(adapter)
  assert_pool_grads_close(injected, merged)
