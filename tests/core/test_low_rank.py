"""The low-rank term's hand-written backward pass (``low_rank_term``'s ``custom_vjp``).

Oracles, none of which runs the code under test: the closed-form gradients in float64 NumPy; the
plain formula ``scale · (x Aᵀ) Bᵀ`` differentiated by JAX; and, through every backend (linen
per-layer and ``nn.scan``, NNX per-layer and ``nnx.scan``), the pool gradients of the merged model
``W + scale · Aᵀ Bᵀ``, which never calls the low-rank term.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mos_jax
from oracles.helpers import full_width_upcasts, rel_err, random_pools

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


@pytest.mark.parametrize("scale", [0.7, "array"])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("r", RANKS)
def test_term_and_all_four_gradients_match_numpy(scale, lead, r):
  x, a, b, g = arrays(lead=lead, r=r)
  s = 0.7 if scale == 0.7 else jnp.float32(0.7)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, *(jnp.asarray(t, jnp.float32) for t in (x, a, b)), s)
  grads = vjp(jnp.asarray(g, jnp.float32))
  want = numpy_gradients(x, a, b, g, 0.7)
  assert rel_err(y, want[0]) < 1e-5
  for got, ref, name in zip(grads, want[1:], ("x", "A", "B", "scale")):
    assert np.shape(got) == np.shape(ref), name
    assert rel_err(got, ref) < 1e-5, name


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
  assert rel_err(got[0], want[0]) < 1e-5
  for g, w in zip(got[1], want[1]):
    assert rel_err(g, w) < 1e-5


BF16_EPS = 2.0 ** -8  # bfloat16's machine epsilon (8 significant bits)


def bf16_exact(t):
  """``t`` rounded to bfloat16, as float64: the value a bfloat16 array of ``t`` holds exactly."""
  return np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("lead", [(7,), (4, 33)])
@pytest.mark.parametrize("r", RANKS)
def test_bfloat16_input_float32_factors_match_numpy_within_bfloat16_roundings(lead, r):
  """A bfloat16 model's term and gradients, against float64 on the same (bfloat16-exact) inputs.

  Only ``A``, ``B``, ``h``, ``dh`` and the outputs are rounded to bfloat16 (each at most half an
  epsilon, relative), the sums run in float32: a few epsilons in all, where bfloat16 accumulation
  over d_in = 16 terms would be off by several times that.
  """
  x, a, b, g = arrays(seed=5, lead=lead, r=r)
  x, g = bf16_exact(x), bf16_exact(g)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, jnp.asarray(x, jnp.bfloat16), jnp.asarray(a, jnp.float32),
                   jnp.asarray(b, jnp.float32), 0.7)
  dx, da, db, ds = vjp(jnp.asarray(g, jnp.bfloat16))
  assert (y.dtype, dx.dtype) == (jnp.bfloat16, jnp.bfloat16)
  assert (da.dtype, db.dtype) == (jnp.float32, jnp.float32)  # float32 pools get float32 gradients
  want = numpy_gradients(x, a, b, g, 0.7)
  for got, ref, name in zip((y, dx, da, db), want, ("y", "x", "A", "B")):
    assert np.shape(got) == np.shape(ref), name
    err = rel_err(got, ref)
    assert err <= 4 * BF16_EPS, (name, err)
  # The scale's gradient is one sum of g·term that cancels: its error scales with the summands.
  summands = np.abs(g.reshape(-1, D_OUT) * (x.reshape(-1, D_IN) @ a.T @ b.T)).sum()
  assert abs(float(ds) - want[4]) <= 4 * BF16_EPS * summands


@pytest.mark.parametrize("x_dtype,f_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                             (jnp.float32, jnp.bfloat16), (jnp.float32, jnp.float32)])
@pytest.mark.parametrize("r", RANKS)
def test_the_term_is_in_the_inputs_dtype_and_each_gradient_in_its_operands(x_dtype, f_dtype, r):
  x, a, b, _ = arrays(seed=2, r=r)
  x, a, b = jnp.asarray(x, x_dtype), jnp.asarray(a, f_dtype), jnp.asarray(b, f_dtype)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, x, a, b, 0.5)
  assert y.dtype == x_dtype
  dx, da, db, _ = vjp(jnp.ones_like(y))
  assert (dx.dtype, da.dtype, db.dtype) == (x.dtype, a.dtype, b.dtype)
  want = numpy_gradients(*(np.asarray(t, np.float64) for t in (x, a, b)), np.ones(y.shape), 0.5)
  tol = 4 * BF16_EPS if jnp.bfloat16 in (x_dtype, f_dtype) else 1e-6
  for got, ref in zip((y, dx, da, db), want):
    assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("r", RANKS)
def test_float32_path_matches_float64_to_float32_accuracy(r):
  """The float32 path is the float32 formula: within 1e-6 of float64 (bit for bit the code before bfloat16 support)."""
  x, a, b, g = arrays(seed=6, lead=(4, 33), r=r)
  y, vjp = jax.vjp(mos_jax.core.low_rank_term, *(jnp.asarray(t, jnp.float32) for t in (x, a, b)), 0.7)
  grads = vjp(jnp.asarray(g, jnp.float32))
  for got, ref in zip((y, *grads), numpy_gradients(x, a, b, g, 0.7)):
    assert rel_err(got, ref) <= 1e-6


def test_a_bfloat16_input_is_never_copied_to_float32():
  x, a, b, g = arrays(seed=7, lead=(64,))
  x, g = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def fwd_bwd(x, a, b, g):
    y, vjp = jax.vjp(mos_jax.core.low_rank_term, x, a, b, 0.5)
    return y, vjp(g)

  assert full_width_upcasts(fwd_bwd, x, a, b, g, min_size=64 * D_IN) == []
  # The check sees one: the plain formula's promotion copies x to float32.
  assert full_width_upcasts(lambda x, a, b: plain_term(x, a, b, 0.5), x, a, b, min_size=64 * D_IN) != []


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
      assert rel_err(got.pools[name][f], w) < 1e-5, (name, f)


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


# ----------------------------------------------------------------- bfloat16 models


def bf16_tree(tree):
  return jax.tree_util.tree_map(lambda t: t.astype(jnp.bfloat16) if jnp.issubdtype(t.dtype, jnp.floating) else t,
                                tree)


def bf16_loss(y):
  return (jnp.sin(y) ** 2).sum(dtype=jnp.float32)


@pytest.mark.parametrize("backend", ["linen", pytest.param("linen scanned", marks=pytest.mark.slow), "nnx",
                                     pytest.param("nnx scanned", marks=pytest.mark.slow)])
def test_a_bfloat16_model_trains_float32_pools_without_float32_activations(backend):
  """bfloat16 params and input, float32 pools: the pools' gradients are float32 and equal the merged
  float32 model's within bfloat16 roundings (those of the base model's activations through three
  layers dominate: 3-11 epsilons measured, against 1e-5 for a float32 model), and no activation is
  copied to float32 on the way."""
  x = jnp.asarray(bf16_exact(jax.random.normal(jax.random.key(0), (2, 8, D_IN))), jnp.float32)
  scanned = backend.endswith("scanned")
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, target_modules=NAMES)
  if scanned:
    config = dataclasses.replace(config, stacked_modules=NAMES, layer_axis=0)
  if backend.startswith("linen"):
    model = LinenScanned() if scanned else LinenUnrolled()
    params = bf16_tree(model.init(jax.random.key(1), x)["params"])  # the oracle's float32 copy holds these values
    adapter = small_pools(mos_jax.adapt(params, config))

    def adapted(ad, x):
      return bf16_loss(model.apply({"params": mos_jax.linen.with_factors(params, ad)}, x))

    def loss(ad, x):
      with mos_jax.linen.inject(ad):
        return adapted(ad, x)

    def merged(ad):
      return bf16_loss(model.apply({"params": mos_jax.merge(jax.tree_util.tree_map(lambda p: p.astype(jnp.float32),
                                                                                   params), ad)}, x))
  else:
    base = NNXScanned(nnx.Rngs(0)) if scanned else NNXUnrolled(nnx.Rngs(0))
    graphdef, state = nnx.split(base)
    base = nnx.merge(graphdef, bf16_tree(state))
    graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(base, config))
    adapter = small_pools(adapter)

    def loss(ad, x):
      return bf16_loss(mos_jax.nnx.bind(graphdef, ad, state)(x))

    def merged(ad):
      m = mos_jax.nnx.merge(mos_jax.nnx.bind(graphdef, ad, jax.tree_util.tree_map(
          lambda t: t.astype(jnp.float32) if jnp.issubdtype(t.dtype, jnp.floating) else t, state)))
      return bf16_loss(m(x))

  xb = x.astype(jnp.bfloat16)
  grads = jax.jit(jax.grad(loss))(adapter, xb)
  want = jax.jit(jax.grad(merged))(adapter)
  for name in want.pools:
    for f in ("A", "B"):
      got = grads.pools[name][f]
      assert got.dtype == jnp.float32, (name, f)
      assert np.abs(np.asarray(want.pools[name][f])).max() > 0, (name, f)
      err = rel_err(got, want.pools[name][f])
      assert err <= 16 * BF16_EPS, (name, f, err)
  # Every activation is (2, 8, 16) or (2, 8, 24): the loss's own float32 sum converts the model output
  # once (twice when unrolled into the backward's fusions at most); the adapter adds none.
  upcasts = full_width_upcasts(jax.grad(loss), adapter, xb, min_size=2 * 8 * D_IN)
  assert upcasts == [], upcasts
