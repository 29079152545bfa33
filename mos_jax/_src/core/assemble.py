"""Assembly of every layer's low-rank factors from the shard pools, and their use.

Pure functions of an :class:`~mos_jax.core.Adapter`: ``assemble`` gathers the
factors, ``low_rank_term`` applies them to an input without forming ``ΔW``, and
``merge``/``unmerge`` fold ``ΔW`` into (or out of) the base kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.adapter import Adapter, require_adapter
from mos_jax._src.core.pools import check_pools
from mos_jax._src.core.targets import Group, check_params, kernel_module, path_str

Factors = dict[str, dict[str, jax.Array]]

#: The named scope of the assembly's operations (forward gather and backward scatter-add): profiles and
#: HLO name them by it (``jvp(mos_assemble)``, ``transpose(jvp(mos_assemble))``).
ASSEMBLY_SCOPE = "mos_assemble"


def gather_factors(p_a: jax.Array, p_b: jax.Array, index_a: np.ndarray, index_b: np.ndarray, group: Group,
                   rank: int) -> tuple[jax.Array, jax.Array]:
  """One gather per pool: ``A: (..., r, d_in)`` and ``B: (..., d_out, r)`` for index arrays ``(..., r·l)``.

  Rank vector ``j`` of ``A`` is the concatenation of shards ``index[j·l] ... index[j·l + l - 1]``
  (docs/method.md §5); ``index`` may hold one layer's ids or a stack of layers'. The ids must come
  from an :class:`~mos_jax.AdapterSpec`, which checked them against the pools when it was made.
  Traced under the named scope :data:`ASSEMBLY_SCOPE`.
  """
  lead = index_a.shape[:-1]
  with jax.named_scope(ASSEMBLY_SCOPE):
    # AdapterSpec checks every id against its pool when it is made, so the gather needs neither a clamp
    # (which would read the wrong shard) nor the NaN-fill select of an out-of-range id.
    a = p_a.at[index_a.reshape(-1)].get(mode="promise_in_bounds").reshape(*lead, rank, group.d_in)
    b = p_b.at[index_b.reshape(-1)].get(mode="promise_in_bounds").reshape(*lead, rank, group.d_out)
    return a, jnp.swapaxes(b, -1, -2)


def assemble(adapter: Adapter) -> Factors:
  """Builds each group's stacked factors with one gather per pool.

  ``A = take(P_A, index_a).reshape(L, r, d_in)`` concatenates the ``l``
  consecutive shards of each rank vector; ``B`` likewise, transposed to
  ``(L, d_out, r)``. Pure and jit-compatible; the gradient flows back into the
  pools as a scatter-add. The routing is static, so there is no Python loop
  over layers, only over module types.

  Args:
    adapter: from :func:`mos_jax.adapt`.

  Returns:
    ``{group: {"A": (L, r, d_in), "B": (L, d_out, r)}}``.

  Example:
    >>> factors = jax.jit(assemble)(adapter)  # doctest: +SKIP
  """
  spec = require_adapter(adapter, "assemble").spec
  check_pools(adapter.pools, spec)
  r = spec.config.rank
  factors = {}
  for g in spec.groups:
    a, b = gather_factors(adapter.pools[g.name]["A"], adapter.pools[g.name]["B"], spec.index_a[g.name],
                          spec.index_b[g.name], g, r)
    factors[g.name] = {"A": a, "B": b}
  return factors


def layer_factors(adapter: Adapter, factors: Factors | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per-layer view: module path -> ``(A_i: (r, d_in), B_i: (d_out, r))``.

  Stacked groups map their single path to the stacked ``(L, r, d_in)``,
  ``(L, d_out, r)`` pair.

  Args:
    adapter: the adapter.
    factors: ``assemble(adapter)`` if already computed.
  """
  factors = assemble(adapter) if factors is None else factors
  out = {}
  for g in adapter.groups:
    a, b = factors[g.name]["A"], factors[g.name]["B"]
    if g.stacked:
      out[g.paths[0]] = (a, b)
    else:
      for i, path in enumerate(g.paths):
        out[path] = (a[i], b[i])
  return out


def low_rank_term(x: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array) -> jax.Array:
  """``scale · (x @ Aᵀ) @ Bᵀ`` without forming ``ΔW``; ``x: (..., d_in)``, ``A: (r, d_in)``, ``B: (d_out, r)``.

  Computed in the input's dtype: ``A`` and ``B`` (usually float32, from float32 pools) are cast to
  ``x.dtype`` for the matmuls, every product accumulates in float32 (or wider), and the term comes
  back in ``x.dtype``. A bfloat16 model's activations are thus never copied to float32, and the
  input saved for the backward pass is ``x`` itself. The gradients of ``A`` and ``B`` are
  accumulated in float32 and returned in their own dtypes, so float32 pools get float32 gradients
  from a bfloat16 model.

  Written for the cost of a train step (MoS or LoRA) over the frozen model, which on CPU is
  set by how often full-width ``(tokens, d)`` arrays are read and written, not by FLOPs:

  * the scale multiplies ``A`` (``r × d_in``), never a full-width array;
  * up to rank :data:`FUSED_RANK_MAX`, ``h Bᵀ`` (``h = x Aᵀ``) is ``r`` broadcast
    multiply-adds that XLA fuses into the layer's add and whatever follows, so the term is never
    written out or saved for the backward pass;
  * the backward pass is written by hand (a ``jax.custom_vjp``): it saves ``x`` and the
    ``(tokens, r)`` intermediate only and runs four rank-``r`` products, each reading one
    full-width array once, ``dB`` in the orientation CPU matmul kernels run fast.

  Values equal the plain formula's up to float rounding (the rounding of ``A``, ``B``, ``h`` and
  ``dh`` to ``x.dtype`` when that is narrower than theirs). As a ``custom_vjp`` the term supports
  reverse mode (``grad``, ``vjp``), ``jit``, ``vmap`` and ``scan``, not forward mode (``jvp``).

  Args:
    x: the layer input, ``(..., d_in)``, in the model's compute dtype.
    a: ``A``, ``(r, d_in)``.
    b: ``B``, ``(d_out, r)``.
    scale: ``α/r`` (a Python number or a scalar array; it gets a gradient too).

  Returns:
    The term, ``(..., d_out)``, in ``x.dtype`` (a non-float ``x`` computes in the factors' dtype).

  Example:
    >>> x, a, b = jnp.ones((2, 3)), jnp.ones((1, 3)), jnp.ones((4, 1))
    >>> low_rank_term(x, a, b, 0.5).tolist()
    [[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5]]
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(a, b))
  return _low_rank(x, a * scale, b)


#: Largest rank whose ``h Bᵀ`` is computed as fused multiply-adds instead of a matmul: on CPU the
#: fused form wins at r = 8 (no ``(tokens, d_out)`` term written, read back or saved) and loses at
#: r = 16, where XLA repeats the ``r`` multiply-adds in every consumer it fuses them into.
FUSED_RANK_MAX = 8


def _accumulator(dtype: Any) -> Any:
  """The dtype products of ``dtype`` operands accumulate in: float32, or the operands' own if wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _dot(spec: str, p: jax.Array, q: jax.Array, dtype: Any) -> jax.Array:
  """``einsum(spec, p, q)`` on operands cast to ``dtype``, accumulated (and returned) in its accumulator."""
  return jnp.einsum(spec, p.astype(dtype), q.astype(dtype), preferred_element_type=_accumulator(dtype))


def _expand(h: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  """``h Bᵀ``: ``(..., r) × (d_out, r) -> (..., d_out)`` in ``dtype``, accumulated in its accumulator."""
  r = h.shape[-1]
  if r > FUSED_RANK_MAX:
    return _dot("...r,or->...o", h, b, dtype).astype(dtype)
  acc = _accumulator(dtype)  # accumulate as a matmul would, not in bfloat16
  h = h.astype(acc)
  rows = b.T.astype(acc).reshape((r,) + (1,) * (h.ndim - 1) + (b.shape[0],))
  out = h[..., 0:1] * rows[0]
  for j in range(1, r):
    out = out + h[..., j:j + 1] * rows[j]
  return out.astype(dtype)


def _down(x: jax.Array, a: jax.Array) -> jax.Array:
  """``h = x Aᵀ``, ``(..., r)``, with ``A`` cast to ``x.dtype`` and the sum kept in the accumulator dtype."""
  return _dot("...i,ri->...r", x, a, x.dtype)


@jax.custom_vjp
def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``(x @ Aᵀ) @ Bᵀ`` in ``x.dtype``, differentiated by :func:`_low_rank_bwd`."""
  return _expand(_down(x, a), b, x.dtype)


def _low_rank_fwd(x, a, b):
  h = _down(x, a)
  # The rank-r intermediate is the only residual beyond the inputs: (tokens, r) floats. x is
  # saved as it came (bfloat16 stays bfloat16), A and B in their own (pool) dtype.
  return _expand(h, b, x.dtype), (x, a, b, h)


def _rows(t: jax.Array) -> jax.Array:
  return t.reshape(-1, t.shape[-1])


def _low_rank_bwd(res, g):
  """Four rank-r products, each reading one full-width array once: ``x`` twice, ``g`` twice in all.

  Autodiff of the plain formula scales the ``(tokens, d_out)`` cotangent by
  ``scale`` and, on CPU, copies it transposed for ``dB``; here nothing
  full-width is scaled, copied or cast: the rank-r operands (``A``, ``B``, ``h``,
  ``dh``) are cast to the input's dtype, and every product accumulates in float32.
  """
  x, a, b, h = res
  dtype = x.dtype
  g2, h2, x2 = _rows(g.astype(dtype)), _rows(h), _rows(x)
  dh = _dot("to,or->tr", g2, b, dtype)            # (tokens, r)
  # dBᵀ = hᵀ g as an (r, d_out) product: with d_out minor the CPU kernels run it ~5x faster than
  # the (d_out, r) form, into which XLA folds a plain transpose; the barrier keeps this form and
  # leaves the transpose to the small (r, d_out) result.
  db = jax.lax.optimization_barrier(_dot("tr,to->ro", h2, g2, dtype)).T
  da = _dot("tr,ti->ri", dh, x2, dtype)            # (r, d_in), d_in minor: the fast form too
  dx = _dot("tr,ri->ti", dh, a, dtype).reshape(x.shape)
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def delta_weight(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale · Aᵀ Bᵀ`` as a flat ``(d_in, d_out)`` matrix (stacked ``(L, d_in, d_out)`` if ``a`` is 3-D)."""
  return scale * jnp.einsum("...ri,...or->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def kernel_delta(group: Group, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``ΔW`` in the layout of the group's kernel leaf (einsum axes and layer axis restored).

  The flat ``(d_in, d_out)`` matrix is reshaped to the contracted then the free
  kernel axes and transposed back to the kernel's own axis order.
  """
  dw = delta_weight(a, b, scale)
  axes = group.in_axes + group.out_axes
  split = tuple(group.kernel_shape[i] for i in axes)
  order = tuple(int(i) for i in np.argsort(axes))
  if not group.stacked:
    return dw.reshape(split).transpose(order)
  dw = dw.reshape((group.num_layers, *split)).transpose((0, *(o + 1 for o in order)))
  return jnp.moveaxis(dw, 0, group.layer_axis)


def _fold(params: Any, adapter: Adapter, sign: float) -> Any:
  require_adapter(adapter, "merge/unmerge")
  check_params(params, adapter.config, adapter.groups)
  per_path = layer_factors(adapter)
  by_path = {p: g for g in adapter.groups for p in g.paths}
  scale = sign * adapter.config.scale

  def update(path, leaf):
    module = kernel_module(path_str(path))
    hit = per_path.get(module) if module is not None else None
    if hit is None:
      return leaf
    return (leaf.astype(jnp.float32) + kernel_delta(by_path[module], *hit, scale)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(update, params)


def merge(params: Any, adapter: Adapter) -> Any:
  """Returns params with ``W + (α/r)·Aᵀ Bᵀ`` in every adapted kernel.

  Computed in float32 and cast back to each kernel's dtype; the container type
  (dict, ``FrozenDict``) is kept.

  Args:
    params: the base params the adapter was created for.
    adapter: the (trained) adapter.

  Returns:
    Plain params for the unmodified model.

  Raises:
    ValueError: ``params`` are not the model the adapter was made for (missing
      or extra layers, other kernel shapes); the message lists the differences.

  Example:
    >>> merged = merge(model.params, adapter)  # doctest: +SKIP
  """
  return _fold(params, adapter, +1.0)


def unmerge(params: Any, adapter: Adapter) -> Any:
  """Inverse of :func:`merge`: subtracts ``(α/r)·Aᵀ Bᵀ`` from the adapted kernels."""
  return _fold(params, adapter, -1.0)
