"""The NNX modules an adapted model is made of: shared pools, and a wrapper around each adapted layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mos_jax.core import EinsumSpec, Group, Routing, gather_factors, low_rank_term


class GroupPools(nnx.Module):
  """One module type's pools ``P_A``, ``P_B`` as ``nnx.LoRAParam``; every layer of the type holds this same object.

  Being one shared object, it stays one variable through ``nnx.split``/``merge``,
  ``nnx.jit`` and ``nnx.Optimizer``, so ``nnx.state(model, nnx.LoRAParam)``
  holds each pool once: exactly MoS's trainable parameters.
  """

  def __init__(self, a: jax.Array, b: jax.Array):
    self.a = nnx.LoRAParam(a)
    self.b = nnx.LoRAParam(b)


class MoSLayer(nnx.Module):
  """A layer of the base model plus its MoS low-rank term: ``base(x) + (α/r)·(x Aᵀ) Bᵀ``.

  ``A_i``, ``B_i`` are gathered from the shared :class:`GroupPools` with this
  layer's static routing (spec §5); ``ΔW`` is never formed. Dense layers map
  ``(..., d_in) -> (..., d_out)``; einsum layers (``nnx.Einsum``, Tunix/gemma
  ``Einsum``) flatten their contracted input dims and unflatten their free
  output dims as the equation says.

  Attributes:
    base: the wrapped layer, unchanged (its kernel stays a frozen ``nnx.Param``).
    pools: the group's shared pools.
    routing: the adapter's static routing (config, groups, index arrays).
    group: this layer's module type.
    layer: this layer's index in the group.
    kernel_name: the attribute of ``base`` holding the kernel (``kernel``, ``w``).
    dropout: adapter-input dropout, or ``None``.
  """

  def __init__(self, base: nnx.Module, pools: GroupPools, *, routing: Routing, group: Group, layer: int,
               kernel_name: str, rngs: nnx.Rngs | None = None):
    self.base = base
    self.pools = pools
    self.routing = routing
    self.group = group
    self.layer = layer
    self.kernel_name = kernel_name
    rate = routing.config.dropout
    if rate > 0 and rngs is None:
      raise ValueError(f"MoSConfig.dropout={rate} needs rngs (e.g. nnx.Rngs(dropout=0)) to draw its masks.")
    self.dropout = nnx.Dropout(rate, rngs=rngs) if rate > 0 else None

  def __getattr__(self, name: str) -> Any:
    # Models read their layers' attributes (Tunix reads `attn_vec_einsum.shape`, `q_einsum.w`):
    # anything this wrapper does not have is the base layer's.
    base = self.__dict__.get("base")
    if base is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(base, name)

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """This layer's ``A: (r, d_in)``, ``B: (d_out, r)``."""
    name = self.group.name
    return gather_factors(self.pools.a[...], self.pools.b[...], self.routing.index_a[name][self.layer],
                          self.routing.index_b[name][self.layer], self.group, self.routing.config.rank)

  def _spec(self, args: tuple, kwargs: dict) -> EinsumSpec | None:
    # The equation given to the call takes precedence, as in nnx.Einsum.
    eq = kwargs.get("einsum_str") or (args[0] if args and isinstance(args[0], str) else None)
    eq = eq or getattr(self.base, "einsum_str", None)
    return EinsumSpec.parse(eq) if isinstance(eq, str) else None

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base(x, *args, **kwargs)
    a, b = self.factors()
    flat, unflatten = jnp.asarray(x).astype(a.dtype), lambda t: t
    spec = self._spec(args, kwargs)
    if spec is not None:
      flat, unflatten = spec.flat_io(flat, self.group)
    if self.dropout is not None:
      flat = self.dropout(flat)
    return y + unflatten(low_rank_term(flat, a, b, self.routing.config.scale)).astype(y.dtype)
