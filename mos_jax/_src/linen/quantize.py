"""Weight-only quantization of the frozen base: int8 or NF4 kernels, dequantized on the fly.

The paper trains MoS on a 4-bit (QLoRA-style) base. Here the large dense
``kernel`` leaves of the frozen params are replaced by small pytree nodes
holding integer codes and float32 scales; everything else (norms, biases,
embeddings) is left untouched. Two ways to use them inside a jitted step:

* :func:`dequantize` the whole tree at the top of the loss. Simple, but JAX
  keeps every dequantized kernel alive from the forward to the backward pass
  (each is needed for the input gradient), so the step holds a
  full-precision copy of the base as temporaries.
* :func:`dequantized_dense`: pass the quantized tree straight to the model and
  let each ``nn.Dense`` dequantize its own kernel when called, and again in
  the backward pass instead of saving it. Only about a layer's worth of
  full-precision weights is live at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax._src.core.targets import KERNEL, kernel_module, matches, path_str
from mos_jax._src.linen.intercept import intercept_kernel_calls, module_input

Scheme = Literal["int8", "nf4"]

#: QLoRA's NormalFloat-4 codebook (bitsandbytes ``create_normal_map``): 16
#: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_INT8_MAX = 127  # symmetric: -128 is never used, so negation is exact


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
  """An int8 kernel with one symmetric absmax scale per output channel.

  ``W ≈ values * scale`` with ``scale = max_i |W[i, j]| / 127`` per column
  (Flax kernels are ``(d_in, d_out)``, so a column is one output feature). A
  stacked ``(L, d_in, d_out)`` kernel gets ``(L, d_out)`` scales.

  Attributes:
    values: int8 codes, the kernel's shape.
    scale: float32 step per output channel, shape ``(..., d_out)``.
    dtype: name of the original kernel dtype, restored by :meth:`dequantize`.
  """

  values: jax.Array
  scale: jax.Array
  dtype: str = "float32"

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """``values * scale`` in ``dtype`` (default: the original kernel dtype)."""
    w = self.values.astype(jnp.float32) * self.scale[..., None, :]
    return w.astype(dtype or self.dtype)


@dataclasses.dataclass(frozen=True)
class NF4Kernel:
  """A 4-bit NormalFloat kernel: blockwise absmax scales, two codes per byte.

  Blocks of ``block_size`` consecutive input features of one output column
  (the last block may be shorter) share a float32 absmax; each weight is the
  nearest :data:`NF4_CODEBOOK` entry of ``W / absmax``. Codes of input rows
  ``2k`` (high nibble) and ``2k+1`` (low nibble) share a byte. Unlike QLoRA,
  the scales are not themselves quantized ("double quantization"), so
  storage is ``0.5 + 4 / block_size`` bytes per weight.

  Attributes:
    packed: uint8, shape ``(..., d_in // 2, d_out)``.
    scale: float32 block absmax, shape ``(..., ceil(d_in / block_size), d_out)``.
    dtype: name of the original kernel dtype, restored by :meth:`dequantize`.
    block_size: input features per scale.
  """

  packed: jax.Array
  scale: jax.Array
  dtype: str = "float32"
  block_size: int = 64

  @property
  def shape(self) -> tuple[int, ...]:
    *lead, half, d_out = self.packed.shape
    return (*lead, 2 * half, d_out)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """Codebook lookup times block scale, in ``dtype`` (default: original)."""
    codes = jnp.stack([self.packed >> 4, self.packed & 0xF], axis=-2).reshape(self.shape)
    # A 16-entry table gather; XLA fuses it with the scaling into one loop.
    w = jnp.take(jnp.asarray(NF4_CODEBOOK, jnp.float32), codes.astype(jnp.int32), mode="clip")
    return (w * _per_row(self.scale, self.block_size, self.shape[-2])).astype(dtype or self.dtype)


def _per_row(scale: jax.Array, block_size: int, d_in: int) -> jax.Array:
  """Block scales ``(..., blocks, d_out)`` repeated to rows ``(..., d_in, d_out)``."""
  rows = jnp.repeat(scale, block_size, axis=-2, total_repeat_length=scale.shape[-2] * block_size)
  return rows[..., :d_in, :]


jax.tree_util.register_dataclass(QuantizedKernel, data_fields=["values", "scale"], meta_fields=["dtype"])
jax.tree_util.register_dataclass(NF4Kernel, data_fields=["packed", "scale"], meta_fields=["dtype", "block_size"])

Quantized = QuantizedKernel | NF4Kernel


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantized kernel node (use as ``is_leaf`` in tree maps)."""
  return isinstance(x, (QuantizedKernel, NF4Kernel))


def _check_finite(kernel: Any, name: str) -> None:
  """Raises ``ValueError`` for NaN/inf in a concrete kernel: one would turn its whole
  int8 column or NF4 block (the shared absmax scale) into NaN, silently."""
  if isinstance(kernel, jax.core.Tracer):
    return  # traced (quantize under jit): the values are not known here
  bad = ~np.isfinite(np.asarray(kernel, np.float32))
  if bad.any():
    where = tuple(int(i[0]) for i in np.nonzero(bad))
    raise ValueError(f"{name} of shape {tuple(np.shape(kernel))} holds {int(bad.sum())} NaN/inf value(s) "
                     f"(first at index {where}); quantizing it would make the whole column/block that shares "
                     "its scale NaN. Fix the weights, or leave this kernel out (pattern/exclude).")


def quantize_int8(kernel: jax.Array) -> QuantizedKernel:
  """Symmetric per-output-channel int8 quantization of one kernel.

  Args:
    kernel: float ``(..., d_in, d_out)``.

  Returns:
    A :class:`QuantizedKernel`; ``|W - dequantize| <= scale / 2`` per column.

  Raises:
    ValueError: the kernel holds NaN or inf.

  Example:
    >>> q = quantize_int8(jnp.array([[1.0, -0.5], [-2.0, 0.25]]))
    >>> q.values.tolist(), q.scale.tolist()
    ([[64, -127], [-127, 64]], [0.015748031437397003, 0.003937007859349251])
  """
  _check_finite(kernel, "Kernel")
  w = jnp.asarray(kernel).astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=-2) / _INT8_MAX
  # An all-zero column keeps scale 0 (exact); divide by 1 there to avoid NaN.
  safe = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(w / safe[..., None, :]), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  return QuantizedKernel(values=values, scale=scale, dtype=jnp.dtype(kernel.dtype).name)


def quantize_nf4(kernel: jax.Array, block_size: int = 64) -> NF4Kernel:
  """Blockwise NF4 quantization of one kernel (blocks run along ``d_in``).

  Args:
    kernel: float ``(..., d_in, d_out)`` with ``d_in`` even (two codes per byte).
    block_size: input features sharing one absmax scale (QLoRA uses 64); if
      it does not divide ``d_in`` the last block is shorter.

  Returns:
    An :class:`NF4Kernel`; each weight decodes to the codebook entry nearest to
    ``W / absmax`` of its block.

  Raises:
    ValueError: ``d_in`` is odd or ``block_size`` is not positive, or the
      kernel holds NaN or inf.

  Example:
    >>> q = quantize_nf4(jnp.ones((96, 3)))
    >>> q.packed.shape, q.scale.shape, q.packed.dtype.name
    ((48, 3), (2, 3), 'uint8')
  """
  *lead, d_in, d_out = kernel.shape
  if block_size < 1 or d_in % 2:
    raise ValueError(f"NF4 packs two input rows per byte, so d_in must be even (and block_size >= 1); "
                     f"got a kernel of shape {tuple(kernel.shape)}, block_size={block_size}. Leave "
                     "this kernel out (pattern/exclude/min_size) or use scheme='int8'.")
  _check_finite(kernel, "Kernel")
  w = jnp.asarray(kernel).astype(jnp.float32)
  blocks = -(-d_in // block_size)
  padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, blocks * block_size - d_in), (0, 0)])
  absmax = jnp.max(jnp.abs(padded.reshape(*lead, blocks, block_size, d_out)), axis=-2)
  normed = w / _per_row(jnp.where(absmax > 0, absmax, 1.0), block_size, d_in)
  code = jnp.asarray(NF4_CODEBOOK, jnp.float32)
  # Nearest codebook entry = count of midpoints below the value.
  codes = jnp.searchsorted((code[1:] + code[:-1]) / 2, normed).astype(jnp.uint8)
  pairs = codes.reshape(*lead, d_in // 2, 2, d_out)
  packed = (pairs[..., 0, :] << 4) | pairs[..., 1, :]
  return NF4Kernel(packed=packed, scale=absmax, dtype=jnp.dtype(kernel.dtype).name, block_size=block_size)


def _selected(module_path: str, leaf: Any, min_size: int, pattern: Any, exclude: Any) -> bool:
  if not (hasattr(leaf, "ndim") and leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)):
    return False
  if int(np.prod(leaf.shape)) < min_size:
    return False
  if pattern is not None and not matches(module_path, pattern):
    return False
  return not matches(module_path, exclude)


def quantize(params: Any, *, scheme: Scheme = "int8", min_size: int = 4096,
             pattern: str | tuple[str, ...] | None = None,
             exclude: str | tuple[str, ...] | None = None, block_size: int = 64) -> Any:
  """Quantizes the frozen base's large dense kernels; other leaves are kept as is.

  A leaf is quantized when it is named ``kernel``, is floating point with at
  least 2 dimensions and ``min_size`` elements, its module path matches
  ``pattern`` (if given) and does not match ``exclude``. Patterns take the same
  forms as :class:`mos_jax.MoSConfig` targets: one regex fullmatched against
  "/"-joined module paths, or a tuple of module names / path suffixes.

  Run it once, outside ``jit`` (it is not meant to be traced per step), and
  keep only the result: the float base can then be freed. Adapt on shapes with
  ``mos_jax.adapt(jax.eval_shape(dequantize, qparams), config)``.

  Args:
    params: a Flax params pytree (dict or ``FrozenDict``).
    scheme: ``"int8"`` (per-output-channel absmax, 1 byte/weight) or
      ``"nf4"`` (blockwise NF4, ~0.56 byte/weight).
    min_size: smallest kernel (in elements) worth quantizing; tiny kernels
      save little memory and pay proportionally more in accuracy.
    pattern: restricts quantization to matching module paths.
    exclude: module paths never quantized (e.g. ``("lm_head",)``).
    block_size: NF4 block length along ``d_in``.

  Returns:
    The same tree with selected ``kernel`` leaves replaced by
    :class:`QuantizedKernel` (int8) or :class:`NF4Kernel` nodes.

  Raises:
    ValueError: unknown ``scheme``, an NF4-selected kernel with odd ``d_in``,
      or a selected kernel holding NaN/inf (named in the message).

  Example:
    >>> qparams = quantize(model.params, exclude=("lm_head",))  # doctest: +SKIP
    >>> loss = jax.jit(lambda q, b: loss_fn(dequantize(q), b))(qparams, batch)  # doctest: +SKIP
  """
  if scheme not in ("int8", "nf4"):
    raise ValueError(f"scheme must be 'int8' or 'nf4', got {scheme!r}")
  for name, value in (("pattern", pattern), ("exclude", exclude)):
    if isinstance(value, str):
      try:
        re.compile(value)
      except re.error as e:
        raise ValueError(f"quantize({name}={value!r}) is not a valid regex: {e}") from e

  def one(path: tuple[Any, ...], leaf: Any) -> Any:
    module_path = kernel_module(path_str(path))
    if module_path is None:
      return leaf
    if not _selected(module_path, leaf, min_size, pattern, exclude):
      return leaf
    _check_finite(leaf, f"Kernel {module_path}")
    return quantize_int8(leaf) if scheme == "int8" else quantize_nf4(leaf, block_size)

  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(qparams: Any, dtype: Any = None) -> Any:
  """Replaces every quantized node by its dense kernel; pure and jit-able.

  Args:
    qparams: output of :func:`quantize`.
    dtype: dtype of the dequantized kernels; ``None`` restores each kernel's
      original dtype. Unquantized leaves are returned unchanged.

  Returns:
    A params tree with the structure of the original float params.

  Example:
    >>> def loss_fn(qparams, batch):  # doctest: +SKIP
    ...   return lm_loss(model(batch["ids"], params=dequantize(qparams, jnp.bfloat16)), batch)
  """
  return jax.tree_util.tree_map(
      lambda x: x.dequantize(dtype) if is_quantized(x) else x, qparams, is_leaf=is_quantized)


@dataclasses.dataclass(frozen=True)
class QuantizedBytes:
  """Storage accounting of a quantized params tree.

  Attributes:
    quantized: bytes of the quantized kernels (codes plus scales).
    original: bytes the same kernels had before quantization.
    other: bytes of every leaf left unquantized.
    num_quantized: number of quantized kernels.
  """

  quantized: int
  original: int
  other: int
  num_quantized: int

  @property
  def total(self) -> int:
    """Bytes of the whole quantized tree."""
    return self.quantized + self.other

  @property
  def ratio(self) -> float:
    """``quantized / original`` over the quantized kernels (0.25 for int8 from f32)."""
    return self.quantized / self.original if self.original else 1.0


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def quantized_bytes(qparams: Any) -> QuantizedBytes:
  """Counts storage bytes of ``qparams`` (arrays or ``ShapeDtypeStruct`` leaves).

  Example:
    >>> b = quantized_bytes(quantize({"d": {"kernel": jnp.ones((64, 64))}}))
    >>> b.quantized, b.original, b.ratio
    (4352, 16384, 0.265625)
  """
  quantized = original = other = count = 0
  for leaf in jax.tree_util.tree_leaves(qparams, is_leaf=is_quantized):
    if is_quantized(leaf):
      count += 1
      quantized += sum(_nbytes(a) for a in jax.tree_util.tree_leaves(leaf))
      original += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    else:
      other += _nbytes(leaf)
  return QuantizedBytes(quantized=quantized, original=original, other=other, num_quantized=count)


def dense_on_quantized(x: jax.Array, node: Quantized, bias: jax.Array | None, dtype: Any,
           precision: Any, promote: Any, dot_general: Any) -> jax.Array:
  """``nn.Dense.__call__`` with the kernel dequantized first (same promotion rules)."""
  kernel = node.dequantize(dtype)
  x, kernel, bias = promote(x, kernel, bias, dtype=dtype)
  y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _after(node: Quantized, g: jax.Array) -> Quantized:
  """``node`` with a fake data dependency on ``g``, so it is used only once ``g`` exists.

  Every leaf (codes too, or CSE would still share the decoded codes with the
  forward pass) gets ``+ 0 * g[0]``, which XLA does not fold (it is NaN for
  non-finite ``g``): the backward dequantization can then be neither hoisted
  into the forward pass nor merged with the forward's. ``jax.checkpoint``'s
  optimization barrier would do this on GPU/TPU, but XLA:CPU drops barriers
  before its last CSE pass.
  """
  tie = g.reshape(-1)[0].astype(jnp.float32) * 0
  return jax.tree_util.tree_map(lambda a: a + tie.astype(a.dtype), node)


def _recomputing_dense(x: jax.Array, node: Quantized, bias: jax.Array | None,
                       **static: Any) -> jax.Array:
  """:func:`dense_on_quantized` whose backward pass dequantizes again instead of saving the kernel.

  Residuals are the codes and scales (already step inputs) and the bias; the
  input cotangent is the transpose of the dense map, so ``x`` is not saved.
  The base is frozen: codes and scales get zero cotangents.
  """
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)

  @jax.custom_vjp
  def f(x, node, bias):
    return dense_on_quantized(x, node, bias, **static)

  def fwd(x, node, bias):
    return dense_on_quantized(x, node, bias, **static), (node, bias)

  def bwd(res, g):
    node, bias = res
    tied = _after(node, g)
    (dx,) = jax.linear_transpose(lambda v: dense_on_quantized(v, tied, None, **static), x_aval)(g)
    zeros = jax.tree_util.tree_map(
        lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
        else jnp.zeros_like(a), node)
    db = None if bias is None else jnp.sum(g, axis=tuple(range(g.ndim - 1))).astype(bias.dtype)
    return dx, zeros, db

  f.defvjp(fwd, bwd)
  return f(x, node, bias)


@contextlib.contextmanager
def dequantized_dense(*, recompute: bool = True) -> Iterator[None]:
  """Lets ``nn.Dense`` layers run on quantized kernels, dequantizing per call.

  Inside the block, a model can be called with :func:`quantize`'s output as
  its params: each ``nn.Dense`` whose ``kernel`` is a quantized node
  dequantizes it (to the layer's ``dtype``, else the original dtype) right
  before its matmul; other layers run unchanged. With ``recompute`` (a
  ``custom_vjp``) the backward pass dequantizes the kernel again from the
  codes instead of keeping the forward's full-precision copy alive, so at
  most about a layer's worth of dequantized weights exists at a time rather
  than a copy of the whole base. (Plain ``jax.checkpoint`` is not enough:
  XLA:CPU removes its optimization barriers and CSE merges the recomputation
  back into the forward pass.)

  With :func:`mos_jax.linen.make_train_step`, enter it inside ``loss_fn``: Flax runs
  the outermost interceptor first, so the adapter's injection (entered around
  ``loss_fn``) wraps this one and still adds its low-rank term.

  Args:
    recompute: dequantize again in the backward pass (default). ``False``
      lets JAX save each dequantized kernel as a residual, which is what
      whole-tree :func:`dequantize` does; faster, but the saving is lost.

  Yields:
    Nothing; models called (traced) inside the block accept quantized kernels.

  Raises:
    NotImplementedError: (when called) a quantized ``nn.Dense`` uses
      ``dot_general_cls``, whose module state this cannot reproduce.

  Example:
    >>> def loss_fn(qparams, batch):  # doctest: +SKIP
    ...   with dequantized_dense():
    ...     logits = model(batch["ids"], params=qparams).logits
    ...   return cross_entropy(logits, batch)
  """
  def handle(module, next_fun, args, kwargs):
    if not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    node = module.get_variable("params", KERNEL)
    if not is_quantized(node):
      return next_fun(*args, **kwargs)
    if module.dot_general_cls is not None:
      raise NotImplementedError(f"nn.Dense at {'/'.join(module.path)} uses dot_general_cls; "
                                "dequantize its kernel with dequantize() instead.")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    static = {"dtype": module.dtype, "precision": module.precision, "promote": module.promote_dtype,
              "dot_general": module.dot_general or jax.lax.dot_general}
    dense = _recomputing_dense if recompute else dense_on_quantized
    return dense(module_input(args, kwargs), node, bias, **static)

  with intercept_kernel_calls(handle):
    yield
