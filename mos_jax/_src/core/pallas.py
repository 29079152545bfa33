"""A dense layer and its low-rank term in one pass: ``x W + scale·(x Aᵀ) Bᵀ`` as Pallas kernels.

The design is in docs/pallas.md. The forward kernel computes ``h = x Aᵀ`` in the same loop over
``d_in`` as the base product ``x W`` (each block of ``x`` is read once, for both) and adds
``h Bᵀ`` to the output block before it is written: the ``(tokens, d_out)`` term never exists in
memory. The backward kernel does the same for the input gradient: ``g Wᵀ`` and ``dh = g B`` in
one loop over ``d_out``, ``dh A`` added before ``dx`` is written. The two weight gradients the
adapter needs, ``dA = dhᵀ x`` and ``dB = gᵀ h``, are rank-``r`` reductions over the tokens, left
to XLA. Products accumulate in float32; ``A`` and ``B`` are cast to the input's dtype for them, as
in :func:`~mos_jax.core.low_rank_term`.

Written for GPUs and TPUs (one program per output block, the contraction looped inside it, so that
the same kernel can lower through Triton and Mosaic; neither lowering has been run: no accelerator
was lent, see docs/pallas.md); on CPU it runs in Pallas's interpreter, which checks it against
the reference but is not a fast path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _accumulator(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _block(n: int, want: int) -> int:
  """The largest divisor of ``n`` that is at most ``want`` (``n`` itself when it is smaller)."""
  b = min(n, want)
  while n % b:
    b -= 1
  return b


def _fwd_kernel(x_ref, w_ref, a_ref, b_ref, y_ref, h_ref, *, block_k: int):
  """One ``(block_m, block_n)`` output block: ``x W`` and ``h = x Aᵀ`` over ``d_in`` in one loop, ``+ h Bᵀ``."""
  from jax.experimental import pallas as pl  # noqa: PLC0415

  dtype = x_ref.dtype
  acc = _accumulator(dtype)
  bm, bn = y_ref.shape
  r = a_ref.shape[0]

  def body(k, carry):
    y, h = carry
    cols = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    x = x_ref[:, cols]
    y = y + jnp.dot(x, w_ref[cols, :], preferred_element_type=acc)
    h = h + jax.lax.dot_general(x, a_ref[:, cols].astype(dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=acc)
    return y, h

  y, h = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body,
                           (jnp.zeros((bm, bn), acc), jnp.zeros((bm, r), acc)))
  term = jax.lax.dot_general(h.astype(dtype), b_ref[...].astype(dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=acc)
  y_ref[...] = (y + term).astype(y_ref.dtype)
  h_ref[...] = h.astype(h_ref.dtype)  # every program of a row block writes the same h


def _bwd_kernel(g_ref, w_ref, a_ref, b_ref, dx_ref, dh_ref, *, block_n: int):
  """One ``(block_m, block_k)`` block of ``dx``: ``g Wᵀ`` and ``dh = g B`` over ``d_out`` in one loop, ``+ dh A``."""
  from jax.experimental import pallas as pl  # noqa: PLC0415

  dtype = g_ref.dtype
  acc = _accumulator(dtype)
  bm, bk = dx_ref.shape
  r = b_ref.shape[1]

  def body(n, carry):
    dx, dh = carry
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    g = g_ref[:, cols]
    dx = dx + jax.lax.dot_general(g, w_ref[:, cols], (((1,), (1,)), ((), ())), preferred_element_type=acc)
    dh = dh + jnp.dot(g, b_ref[cols, :].astype(dtype), preferred_element_type=acc)
    return dx, dh

  dx, dh = jax.lax.fori_loop(0, g_ref.shape[1] // block_n, body,
                             (jnp.zeros((bm, bk), acc), jnp.zeros((bm, r), acc)))
  dx_ref[...] = (dx + jnp.dot(dh.astype(dtype), a_ref[...].astype(dtype), preferred_element_type=acc)
                 ).astype(dx_ref.dtype)
  dh_ref[...] = dh.astype(dh_ref.dtype)


def _fused_fwd(x, w, a, b, *, blocks: tuple[int, int, int], interpret: bool):
  """``(y, h)`` for 2-D ``x (m, d_in)``; ``a`` carries the scale."""
  from jax.experimental import pallas as pl  # noqa: PLC0415

  (m, d_in), d_out, r = x.shape, w.shape[1], a.shape[0]
  bm, bn, bk = _block(m, blocks[0]), _block(d_out, blocks[1]), _block(d_in, blocks[2])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, block_k=bk),
      out_shape=(jax.ShapeDtypeStruct((m, d_out), x.dtype), jax.ShapeDtypeStruct((m, r), _accumulator(x.dtype))),
      grid=(m // bm, d_out // bn),
      in_specs=[pl.BlockSpec((bm, d_in), lambda i, j: (i, 0)), pl.BlockSpec((d_in, bn), lambda i, j: (0, j)),
                pl.BlockSpec((r, d_in), lambda i, j: (0, 0)), pl.BlockSpec((bn, r), lambda i, j: (j, 0))],
      out_specs=(pl.BlockSpec((bm, bn), lambda i, j: (i, j)), pl.BlockSpec((bm, r), lambda i, j: (i, 0))),
      interpret=interpret, name="mos_fused_dense_fwd")(x, w, a, b)


def _fused_bwd_dx(g, w, a, b, *, blocks: tuple[int, int, int], interpret: bool):
  """``(dx, dh)`` for 2-D ``g (m, d_out)``; ``a`` carries the scale."""
  from jax.experimental import pallas as pl  # noqa: PLC0415

  (m, d_out), d_in, r = g.shape, w.shape[0], a.shape[0]
  bm, bn, bk = _block(m, blocks[0]), _block(d_out, blocks[1]), _block(d_in, blocks[2])
  return pl.pallas_call(
      functools.partial(_bwd_kernel, block_n=bn),
      out_shape=(jax.ShapeDtypeStruct((m, d_in), g.dtype), jax.ShapeDtypeStruct((m, r), _accumulator(g.dtype))),
      grid=(m // bm, d_in // bk),
      in_specs=[pl.BlockSpec((bm, d_out), lambda i, k: (i, 0)), pl.BlockSpec((bk, d_out), lambda i, k: (k, 0)),
                pl.BlockSpec((r, bk), lambda i, k: (0, k)), pl.BlockSpec((d_out, r), lambda i, k: (0, 0))],
      out_specs=(pl.BlockSpec((bm, bk), lambda i, k: (i, k)), pl.BlockSpec((bm, r), lambda i, k: (i, 0))),
      interpret=interpret, name="mos_fused_dense_bwd")(g, w, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(x, w, a, b, blocks, interpret):
  return _fused_fwd(x, w, a, b, blocks=blocks, interpret=interpret)[0]


def _fused_vjp_fwd(x, w, a, b, blocks, interpret):
  y, h = _fused_fwd(x, w, a, b, blocks=blocks, interpret=interpret)
  return y, (x, w, a, b, h)


def _fused_vjp_bwd(blocks, interpret, res, g):
  x, w, a, b, h = res
  dtype, acc = x.dtype, _accumulator(x.dtype)
  dx, dh = _fused_bwd_dx(g, w, a, b, blocks=blocks, interpret=interpret)
  da = jnp.einsum("tr,ti->ri", dh.astype(dtype), x, preferred_element_type=acc)
  db = jnp.einsum("tr,to->or", h.astype(dtype), g, preferred_element_type=acc)
  # The kernel is frozen: its gradient is never used by an adapter step (XLA drops it), but a
  # custom VJP must give one; it is the plain product, for callers that do differentiate W.
  dw = jnp.einsum("ti,to->io", x, g, preferred_element_type=acc)
  return dx, dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype)


_fused.defvjp(_fused_vjp_fwd, _fused_vjp_bwd)

#: Default ``(block_m, block_n, block_k)``: tokens, output and input features per program (and per
#: loop step of the contraction). 128 fills a TPU MXU and a GPU warp group's tile.
BLOCKS = (128, 128, 128)


def fused_dense(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array, *,
                blocks: tuple[int, int, int] = BLOCKS, interpret: bool | None = None) -> jax.Array:
  """``x W + scale·(x Aᵀ) Bᵀ`` with the low-rank term fused into the dense product (Pallas kernels).

  Equal to ``x @ w + low_rank_term(x, a, b, scale)`` up to float rounding, with the same dtype
  rules (products accumulate in float32, ``A`` and ``B`` are cast to ``x.dtype``, the result is
  in ``x.dtype``), differentiable in all of ``x``, ``w``, ``a``, ``b`` and ``scale``. Block
  sizes that do not divide a dimension shrink to its largest divisor below them. The design,
  and why it saves what it saves, is in docs/pallas.md.

  Args:
    x: the input, ``(..., d_in)``.
    w: the dense kernel, ``(d_in, d_out)``.
    a: ``A``, ``(r, d_in)``.
    b: ``B``, ``(d_out, r)``.
    scale: ``α/r``.
    blocks: ``(block_m, block_n, block_k)``.
    interpret: run in Pallas's interpreter (any backend, slow); default: on CPU only.

  Returns:
    ``(..., d_out)`` in ``x.dtype``.

  Raises:
    ValueError: the shapes do not chain (the message gives them).

  Example:
    >>> x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    >>> a, b = jnp.ones((2, 8)), jnp.ones((8, 2))
    >>> fused_dense(x, w, a, b, 0.5)[0, 0].item()
    16.0
  """
  if w.ndim != 2 or a.ndim != 2 or b.ndim != 2 or x.shape[-1] != w.shape[0] or a.shape != (b.shape[1], w.shape[0]) \
      or b.shape[0] != w.shape[1]:
    raise ValueError(f"fused_dense needs x (..., d_in), w (d_in, d_out), a (r, d_in), b (d_out, r); got x {x.shape}, "
                     f"w {w.shape}, a {a.shape}, b {b.shape}.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  lead = x.shape[:-1]
  y = _fused(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), a * scale, b, tuple(blocks), bool(interpret))
  return y.reshape(*lead, w.shape[1])
