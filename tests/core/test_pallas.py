"""The fused dense + low-rank Pallas kernels (``mos_jax.core.fused_dense``), run in Pallas's interpreter on CPU.

Oracles: the float64 NumPy closed forms of ``y = x W + s·x Aᵀ Bᵀ`` and of its gradients, and
``low_rank_term`` for the dtype rules. Block sizes are small so that every case runs several
programs of the grid and several steps of each contraction loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mos_jax
from oracles.helpers import rel_err

D_IN, D_OUT, R = 24, 40, 3
#: Several programs per grid axis and several loop steps per contraction (and a block, 7 -> 5 for
#: d_out = 40 and 7 -> 6 for d_in = 24, that shrinks to a divisor).
BLOCKS = (8, 7, 7)
BF16_EPS = 2.0 ** -8


def arrays(seed=0, lead=(2, 12)):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(*lead, D_IN)), rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(R, D_IN)),
          rng.normal(size=(D_OUT, R)), rng.normal(size=(*lead, D_OUT)))


def numpy_reference(x, w, a, b, g, s):
  """``y`` and the cotangents of x, W, A, B and s, in float64."""
  x2, g2 = x.reshape(-1, D_IN), g.reshape(-1, D_OUT)
  h = x2 @ a.T
  y = x2 @ w + s * h @ b.T
  gb = g2 @ b
  return (y.reshape(*x.shape[:-1], D_OUT), (g2 @ w.T + s * gb @ a).reshape(x.shape), x2.T @ g2, s * gb.T @ x2,
          s * g2.T @ h, float(np.sum(g2 * (h @ b.T))))


def fused(x, w, a, b, s):
  return mos_jax.core.fused_dense(x, w, a, b, s, blocks=BLOCKS, interpret=True)


def test_values_and_all_gradients_match_numpy_in_float32():
  x, w, a, b, g = arrays()
  args = [jnp.asarray(t, jnp.float32) for t in (x, w, a, b)]
  y, vjp = jax.vjp(fused, *args, jnp.float32(0.7))
  got = (y, *vjp(jnp.asarray(g, jnp.float32)))
  for name, value, want in zip(("y", "x", "W", "A", "B", "scale"), got, numpy_reference(x, w, a, b, g, 0.7)):
    assert np.shape(value) == np.shape(want), name
    assert rel_err(value, want) <= 1e-5, name


def test_bfloat16_input_keeps_its_dtype_and_float32_factors_get_float32_gradients():
  x, w, a, b, g = arrays(seed=1, lead=(16,))
  x, w, g = (np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64) for t in (x, w, g))  # bfloat16-exact values
  y, vjp = jax.vjp(fused, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(a, jnp.float32),
                   jnp.asarray(b, jnp.float32), 0.7)
  dx, dw, da, db, _ = vjp(jnp.asarray(g, jnp.bfloat16))
  assert (y.dtype, dx.dtype, dw.dtype, da.dtype, db.dtype) == (jnp.bfloat16,) * 3 + (jnp.float32,) * 2
  want = numpy_reference(x, w, a, b, g, 0.7)
  for name, value, ref in zip(("y", "x", "W", "A", "B"), (y, dx, dw, da, db), want):
    assert rel_err(value, ref) <= 4 * BF16_EPS, name


def test_equals_the_dense_layer_plus_low_rank_term_under_jit():
  x, w, a, b, _ = (jnp.asarray(t, jnp.float32) for t in arrays(seed=2))
  got = jax.jit(fused)(x, w, a, b, 0.5)
  assert rel_err(got, x @ w + mos_jax.core.low_rank_term(x, a, b, 0.5)) <= 1e-5


def test_shapes_that_do_not_chain_are_refused_with_their_shapes():
  x, w, a, b, _ = (jnp.asarray(t, jnp.float32) for t in arrays())
  with pytest.raises(ValueError, match=r"a \(r, d_in\).*a \(3, 40\)"):
    mos_jax.core.fused_dense(x, w, jnp.zeros((R, D_OUT)), b, 1.0)
