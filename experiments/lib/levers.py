"""Ways of computing the low-rank term ``(α/r)·(x Aᵀ) Bᵀ`` in a LoRA step, for bench_levers and bench_profile.

Each lever is a function of ``(x, A, B, scale)`` (or, for the levers that own the layer's matmul,
of the kernel too), applied to every adapted ``nn.Dense`` of an HF Flax Llama by
``inject_lever``: a small interceptor written with public names only, so that levers differ in the
term alone. ``tests/experiments/test_bench_levers.py`` checks that every lever computes the plain
formula's loss and gradients.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

import mos_jax
from experiments.lib import bench

Term = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]
#: HF Llama's projections that read the same input, first member first.
SIBLINGS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}


# ----------------------------------------------------------------------------------- levers


def plain(x, a, b, scale):
  return scale * jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b)


def scale_on_r(x, a, b, scale):
  return jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a) * scale, b)


def _rows(t):
  return t.reshape(-1, t.shape[-1])


def _outer_sum(h: jax.Array, m: jax.Array) -> jax.Array:
  """``h @ m`` for ``h (..., r)``, ``m (r, n)`` as ``r`` broadcast multiply-adds (XLA fuses them)."""
  rows = m.reshape((m.shape[0],) + (1,) * (h.ndim - 1) + (m.shape[1],))
  out = h[..., 0:1] * rows[0]
  for j in range(1, h.shape[-1]):
    out = out + h[..., j:j + 1] * rows[j]
  return out


def make_term(fused_up: bool, fused_dx: bool, fast_db: bool) -> Term:
  """A custom-VJP term: ``h Bᵀ`` (and the backward's ``dh A``) fused or a matmul; ``dB`` fast or not."""
  up = (lambda h, b: _outer_sum(h, b.T)) if fused_up else (lambda h, b: jnp.einsum("...r,or->...o", h, b))

  @jax.custom_vjp
  def term(x, a, b):
    return up(jnp.einsum("...i,ri->...r", x, a), b)

  def fwd(x, a, b):
    h = jnp.einsum("...i,ri->...r", x, a)
    return up(h, b), (x, a, b, h)

  def bwd(res, g):
    x, a, b, h = res
    dh = _rows(g) @ b
    if fast_db:
      db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", _rows(h), _rows(g))).T
    else:
      db = jnp.einsum("to,tr->or", _rows(g), _rows(h))
    dx = _outer_sum(dh, a) if fused_dx else dh @ a
    return dx.reshape(x.shape), jnp.einsum("tr,ti->ri", dh, _rows(x)), db

  term.defvjp(fwd, bwd)
  return lambda x, a, b, scale: term(x, a * scale, b)


@jax.custom_vjp
def _down(x, a):
  """``h = x Aᵀ`` with its own backward: ``dA = dhᵀ x``, ``dx = dh A``."""
  return jnp.einsum("...i,ri->...r", x, a)


def _down_fwd(x, a):
  return _down(x, a), (x, a)


def _down_bwd(res, dh):
  x, a = res
  return (_rows(dh) @ a).reshape(x.shape), jnp.einsum("tr,ti->ri", _rows(dh), _rows(x))


_down.defvjp(_down_fwd, _down_bwd)


@jax.custom_vjp
def _up(h, b):
  """``h Bᵀ`` with ``dBᵀ = hᵀ g`` kept in the fast (r, d_out) orientation."""
  return jnp.einsum("...r,or->...o", h, b)


def _up_fwd(h, b):
  return _up(h, b), (h, b)


def _up_bwd(res, g):
  h, b = res
  db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", _rows(h), _rows(g))).T
  return (_rows(g) @ b).reshape(h.shape), db


_up.defvjp(_up_fwd, _up_bwd)


@jax.custom_vjp
def _up_fused(h, b):
  """``h Bᵀ`` as ``r`` fused multiply-adds (as the library up to rank 8), ``dB`` in the fast orientation."""
  return _outer_sum(h, b.T)


def _up_fused_fwd(h, b):
  return _up_fused(h, b), (h, b)


_up_fused.defvjp(_up_fused_fwd, _up_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _folded(x, w, a, b, scale):
  return x @ (w + scale * a.T @ b.T)


def _folded_fwd(x, w, a, b, scale):
  return _folded(x, w, a, b, scale), (x, w, a, b)


def _folded_bwd(scale, res, g):
  x, w, a, b = res
  h = _rows(x) @ a.T * scale
  dh = _rows(g) @ b * scale
  db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", h, _rows(g))).T
  return g @ (w + scale * a.T @ b.T).T, jnp.zeros_like(w), jnp.einsum("tr,ti->ri", dh, _rows(x)), db


_folded.defvjp(_folded_fwd, _folded_bwd)


def make_owned(concat_fwd: bool, concat_bwd: bool) -> Callable[..., jax.Array]:
  """The layer's own matmul and the term in one custom VJP, ``y = x W + (x Aᵀ) Bᵀ`` (``A`` scaled).

  ``concat_fwd``: one matmul ``x [W | Aᵀ]`` gives ``x W`` and ``h = x Aᵀ`` in one pass over ``x``
  (the kernel copied with ``Aᵀ`` beside it every step). ``concat_bwd``: one matmul ``g [W; Bᵀ]ᵀ``
  gives the base's ``g Wᵀ`` and ``dh = g B`` in one pass over ``g``, and ``dh A`` is added as
  fused multiply-adds while the result is sliced (no ``(tokens, d_in)`` term written).
  Otherwise as the library: ``h Bᵀ`` fused, ``dBᵀ = hᵀ g`` in the fast orientation.
  """
  @jax.custom_vjp
  def dense(x, w, a, b):
    return fwd(x, w, a, b)[0]

  def fwd(x, w, a, b):
    d_out = w.shape[1]
    if concat_fwd:
      z = x @ jnp.concatenate([w, a.T], axis=1)
      y, h = z[..., :d_out], z[..., d_out:]
    else:
      y, h = x @ w, jnp.einsum("...i,ri->...r", x, a)
    return y + _outer_sum(h, b.T), (x, w, a, b, h)

  def bwd(res, g):
    x, w, a, b, h = res
    d_in = w.shape[0]
    g2, x2 = _rows(g), _rows(x)
    if concat_bwd:
      z = jnp.einsum("to,ko->tk", g2, jnp.concatenate([w, b.T], axis=0))
      dh = z[:, d_in:]
      dx = z[:, :d_in] + _outer_sum(dh, a)
    else:
      dh = g2 @ b
      dx = g2 @ w.T + dh @ a
    db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", _rows(h), g2)).T
    return dx.reshape(x.shape), jnp.zeros_like(w), jnp.einsum("tr,ti->ri", dh, x2), db

  dense.defvjp(fwd, bwd)
  return dense


#: Levers that compute the layer's own matmul too: ``fn(x, kernel, scale·A, B)``.
OWNED = {"own matmul": make_owned(False, False), "x·[W | Aᵀ] (fwd)": make_owned(True, False),
         "g·[W; Bᵀ]ᵀ (bwd)": make_owned(False, True), "both concatenated": make_owned(True, True)}


# ------------------------------------------------------------------------------ injection


@contextlib.contextmanager
def inject_lever(adapter: mos_jax.Adapter, lever: str) -> Iterator[None]:
  """Adds the adapter's term to every adapted ``nn.Dense`` (HF Llama's projections) the lever's way."""
  per_path = mos_jax.core.layer_factors(adapter)
  scale = float(adapter.config.scale)
  shared: dict[tuple[int, str], jax.Array] = {}
  term = TERMS.get(lever)

  def down_shared(path: str, x: jax.Array) -> jax.Array:
    parent, name = path.rsplit("/", 1)
    if (id(x), path) not in shared:
      paths = [f"{parent}/{n}" for n in SIBLINGS.get(name, (name,)) if f"{parent}/{n}" in per_path]
      a = jnp.concatenate([per_path[p][0] * scale for p in paths])
      h = _down(x, a)
      r = per_path[path][0].shape[0]
      for i, p in enumerate(paths):
        shared[(id(x), p)] = h[..., i * r:(i + 1) * r]
    return shared.pop((id(x), path))

  def handle(module: nn.Module, next_fun, args, kwargs):
    path = "/".join(module.path)
    if path not in per_path or module.is_initializing():
      return next_fun(*args, **kwargs)
    a, b = per_path[path]
    x = mos_jax.linen.module_input(args, kwargs)
    if lever == "fold into W":
      return _folded(x, module.get_variable("params", "kernel"), a, b, scale)
    if lever in OWNED:
      if not isinstance(module, nn.Dense) or module.use_bias:
        raise ValueError(f"lever {lever!r} computes the layer's matmul itself: only bias-free nn.Dense layers, "
                         f"not {path} ({type(module).__name__}).")
      return OWNED[lever](x, module.get_variable("params", "kernel"), a * scale, b)
    y = next_fun(*args, **kwargs)
    if lever == "shared A":
      return y + _up(down_shared(path, x), b)
    if lever == "shared A, fused h·Bᵀ":
      return y + _up_fused(down_shared(path, x), b)
    return y + term(x, a, b, scale)

  with mos_jax.linen.intercept_kernel_calls(handle):
    yield


TERMS: dict[str, Term] = {
    "plain": plain, "scale on r": scale_on_r, "custom VJP": make_term(False, False, False),
    "custom VJP, fast dB": make_term(False, False, True), "+ fused h·Bᵀ": make_term(True, False, True),
    "+ fused h·Bᵀ, dh·A": make_term(True, True, True)}
LEVERS = (*TERMS, "shared A", "shared A, fused h·Bᵀ", "fold into W", *OWNED)


def step_variant(lever: str, loss_fn, params, batch, adapter: mos_jax.Adapter) -> bench.Variant:
  """A compiled LoRA train step (``bench.train_step_variant``) whose term is computed the lever's way."""
  def loss(adapter, params, batch, rng):
    with inject_lever(adapter, lever):
      return loss_fn(params, batch)

  return bench.train_step_variant(lever, f"LoRA step, term computed as: {lever}", loss, adapter, params, batch)
