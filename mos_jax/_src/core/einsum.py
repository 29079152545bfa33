"""Einsum-style kernels as the linear maps they are: which kernel axes are contracted, which are free.

Framework-free, and the one rule every backend whose layers apply a kernel with an
einsum equation (linen ``nn.Einsum``, NNX ``nnx.Einsum``, Tunix/gemma ``Einsum``)
follows: :meth:`EinsumSpec.of_call` says which equation a call applies,
:meth:`EinsumSpec.flat_io` flattens its input to ``(..., d_in)`` and maps the
``(..., d_out)`` low-rank term back to the output's layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mos_jax._src.core.targets import Group, KernelLayout


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
  """An ``"input,kernel->output"`` equation split into MoS's view of it.

  Attributes:
    lhs: the input's labels (may hold ``...``).
    rhs: the kernel's labels.
    out: the output's labels.
    contracted: kernel labels shared with the input only (flatten to ``d_in``), in kernel order.
    free: kernel labels shared with the output only (flatten to ``d_out``), in kernel order.
    keep: the input labels that reach the output without touching the kernel (``...`` first).
  """

  lhs: str
  rhs: str
  out: str
  contracted: str
  free: str
  keep: str

  @classmethod
  def parse(cls, equation: str) -> "EinsumSpec":
    """Parses an explicit two-operand equation, e.g. ``"BTD,NDH->BTNH"``."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
      raise ValueError(f"Einsum {equation!r}: MoS needs an explicit 'input,kernel->output' equation.")
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    bare = lhs.replace("...", "")
    return cls(lhs=lhs, rhs=rhs, out=out,
               contracted="".join(c for c in rhs if c in bare and c not in out),
               free="".join(c for c in rhs if c in out and c not in bare),
               keep=("..." if "..." in lhs else "") + "".join(c for c in bare if c in out and c not in rhs))

  @classmethod
  def of_call(cls, module_equation: str | None, args: tuple, kwargs: dict) -> "EinsumSpec | None":
    """The equation one call of an einsum layer applies, parsed; ``None`` when there is none (a dense layer).

    The equation given to the call (``einsum_str=``, or the first positional
    argument after the input) takes precedence over the module's own, as in
    ``nn.Einsum`` and ``nnx.Einsum``.

    Args:
      module_equation: the layer's own ``einsum_str`` (``None`` if it has none).
      args: the call's positional arguments after the input.
      kwargs: the call's keyword arguments.

    Example:
      >>> EinsumSpec.of_call("BTD,DH->BTH", ("BTD,DF->BTF",), {}).free
      'F'
    """
    given = kwargs.get("einsum_str")
    if given is None and args and isinstance(args[0], str):
      given = args[0]
    equation = given or module_equation
    return cls.parse(equation) if isinstance(equation, str) else None

  def layout(self, module: str) -> KernelLayout:
    """The kernel's layout; unsupported when a kernel label is also a batch label or summed alone."""
    if len(self.contracted) + len(self.free) != len(self.rhs) or not self.contracted or not self.free:
      return KernelLayout(in_axes=(), out_axes=(), module=module, supported=False)
    return KernelLayout(in_axes=tuple(self.rhs.index(c) for c in self.contracted),
                        out_axes=tuple(self.rhs.index(c) for c in self.free), module=module)

  def flat_io(self, x: jax.Array, group: Group) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``x`` as ``(..., d_in)``, and the map from a ``(..., d_out)`` term to the output's layout."""
    # Transposes and reshapes, not one-operand einsums: quantization libraries (qwix) intercept jnp.einsum
    # inside a model's call and accept two-operand equations only.
    moved = _permute(x, self.lhs, self.keep + self.contracted)
    flat = moved.reshape(moved.shape[:moved.ndim - len(self.contracted)] + (group.d_in,))
    free_shape = tuple(group.kernel_shape[a] for a in group.out_axes)

    def unflatten(t: jax.Array) -> jax.Array:
      return _permute(t.reshape(t.shape[:-1] + free_shape), self.keep + self.free, self.out)

    return flat, unflatten


def _permute(x: jax.Array, labels: str, target: str) -> jax.Array:
  """``jnp.einsum(f"{labels}->{target}", x)`` for distinct labels (``...`` first in both, or in neither).

  Axes missing from ``target`` are summed, the rest transposed into its order.
  """
  named, wanted = labels.replace("...", ""), target.replace("...", "")
  lead = x.ndim - len(named)
  summed = tuple(lead + i for i, c in enumerate(named) if c not in wanted)
  if summed:
    x = x.sum(axis=summed)
    named = "".join(c for c in named if c in wanted)
  return jnp.transpose(x, tuple(range(lead)) + tuple(lead + named.index(c) for c in wanted))
