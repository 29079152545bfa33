"""The NNX modules an adapted model is made of: shared pools, and a wrapper around each adapted layer.

Every adapted model checks, each time its ``__call__`` runs as Python (eagerly, or once per
trace under ``jit``), that each of its MoS layers was called: a layer the forward never reaches
(a module read by another path, a call intercepted before the wrapper) would train nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mos_jax._src.core.assemble import gather_factors, kernel_delta, low_rank_term
from mos_jax._src.core.einsum import EinsumSpec
from mos_jax._src.core.routing import AdapterSpec
from mos_jax._src.core.targets import Group


#: The MoS layers called so far by the adapted model whose ``__call__`` is running (``None`` outside one).
_CALLED: contextvars.ContextVar[set | None] = contextvars.ContextVar("mos_called", default=None)


class GroupPools(nnx.Module):
  """One module type's pools ``P_A``, ``P_B`` as ``nnx.LoRAParam``; every layer of the type holds this same object.

  Being one shared object, it stays one variable through ``nnx.split``/``merge``,
  ``nnx.jit`` and ``nnx.Optimizer``, so ``nnx.state(model, nnx.LoRAParam)``
  holds each pool once: exactly MoS's trainable parameters.
  """

  def __init__(self, a: jax.Array, b: jax.Array):
    self.a = nnx.LoRAParam(a)
    self.b = nnx.LoRAParam(b)


class MoSFactor(nnx.Variable):
  """A stacked group's assembled factors, kept beside its stacked kernel (derived from the pools, not trained)."""


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
    spec: the adapter's static :class:`~mos_jax.core.AdapterSpec` (config, groups, index arrays).
    group: this layer's module type.
    layer: this layer's index in the group.
    kernel_name: the attribute of ``base`` holding the kernel (``kernel``, ``w``).
    dropout: adapter-input dropout, or ``None``.
  """

  def __init__(self, base: nnx.Module, pools: GroupPools, *, spec: AdapterSpec, group: Group, layer: int,
               kernel_name: str, rngs: nnx.Rngs | None = None):
    self.base = base
    self.pools = pools
    self.spec = spec
    self.group = group
    self.layer = layer
    self.kernel_name = kernel_name
    rate = spec.config.dropout
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
    return gather_factors(self.pools.a[...], self.pools.b[...], self.spec.index_a[name][self.layer],
                          self.spec.index_b[name][self.layer], self.group, self.spec.config.rank)

  def _spec(self, args: tuple, kwargs: dict) -> EinsumSpec | None:
    # args exclude the input; the core's one rule picks the equation (the call's, else the module's).
    return EinsumSpec.of_call(getattr(self.base, "einsum_str", None), args, kwargs)

  @property
  def key(self) -> tuple[str, int]:
    """``(group, layer)``: the layer's identity in the adapter (what the call-path check reports)."""
    return self.group.name, self.layer

  def pool_items(self) -> list[tuple[str, GroupPools]]:
    """``(group name, pools)`` of the groups this layer draws from (stacked layers: none, the root holds them)."""
    return [] if self.pools is None else [(self.group.name, self.pools)]

  def delta(self) -> jax.Array:
    """``ΔW = (α/r)·Aᵀ Bᵀ`` in the layout of the base kernel."""
    return kernel_delta(self.group, *self.factors(), self.spec.config.scale)

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    _record(self)
    return _call_with_term(self, x, args, kwargs, *self.factors())


def _record(layer: "MoSLayer") -> None:
  called = _CALLED.get()
  if called is not None:
    called.add(layer.key)


def _call_with_term(layer: Any, x: jax.Array, args: tuple, kwargs: dict, a: jax.Array, b: jax.Array) -> jax.Array:
  """``base(x) + (α/r)·(x Aᵀ) Bᵀ`` in the layer's output layout (shared by both wrappers)."""
  y = layer.base(x, *args, **kwargs)
  flat, unflatten = jnp.asarray(x), lambda t: t
  spec = layer._spec(args, kwargs)
  if spec is not None:
    flat, unflatten = spec.flat_io(flat, layer.group)
  if layer.dropout is not None:
    flat = layer.dropout(flat)
  return y + unflatten(low_rank_term(flat, a, b, layer.spec.config.scale)).astype(y.dtype)


class MoSStackedLayer(MoSLayer):
  """A stacked (``nnx.vmap``-created, ``nnx.scan``-run) layer plus its MoS term.

  ``nnx.scan`` slices every variable of the scanned block along the layer axis,
  so this layer holds its group's factors stacked like its kernel (``a``:
  ``(L, r, d_in)``, ``b``: ``(L, d_out, r)``, layer axis moved to the group's
  ``layer_axis``) as :class:`MoSFactor` variables; each scan iteration sees its
  own layer's slice. The pools live outside the scanned block, on the
  :class:`MoSModel` root, which re-assembles these factors (one gather per pool)
  at the start of every call, so gradients reach the pools.
  """

  def __init__(self, base: nnx.Module, *, spec: AdapterSpec, group: Group, kernel_name: str,
               rngs: nnx.Rngs | None = None):
    if spec.config.dropout > 0:
      # The dropout's RNG state would sit in the scanned block and be sliced like its weights.
      raise NotImplementedError(f"Group {group.name!r} is stacked: MoS input dropout is not supported on "
                                "scanned NNX layers yet; use dropout=0.")
    super().__init__(base, None, spec=spec, group=group, layer=-1, kernel_name=kernel_name, rngs=rngs)
    r, axis, dtype = spec.config.rank, group.layer_axis, jnp.dtype(spec.config.pool_dtype)
    self.a = MoSFactor(jnp.moveaxis(jnp.zeros((group.num_layers, r, group.d_in), dtype), 0, axis))
    self.b = MoSFactor(jnp.moveaxis(jnp.zeros((group.num_layers, group.d_out, r), dtype), 0, axis))

  def set_factors(self, a: jax.Array, b: jax.Array) -> None:
    """Stores the group's stacked ``A: (L, r, d_in)``, ``B: (L, d_out, r)``."""
    self.a[...] = jnp.moveaxis(a, 0, self.group.layer_axis)
    self.b[...] = jnp.moveaxis(b, 0, self.group.layer_axis)

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """Inside ``nnx.scan``: this layer's ``(A, B)``; outside: the stacked ``(L, ...)`` pair."""
    a, b = self.a[...], self.b[...]
    if a.ndim == 3:
      return jnp.moveaxis(a, self.group.layer_axis, 0), jnp.moveaxis(b, self.group.layer_axis, 0)
    return a, b

  @property
  def key(self) -> tuple[str, int]:
    return self.group.name, -1

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    _record(self)
    a, b = self.factors()
    if a.ndim != 2:
      raise ValueError(f"Stacked MoS layer {self.group.name!r} was called outside nnx.scan (its factors are "
                       f"{a.shape}); call it through the scan that runs the stack.")
    return _call_with_term(self, x, args, kwargs, a, b)


class MoSModel(nnx.Module):
  """The root of a model with stacked groups: their pools, and a call that refreshes their factors first.

  Attribute access falls through to the wrapped model, so code that reads the
  model's attributes (``model.config``) keeps working. Only ``__call__`` (and
  :meth:`refresh`) re-assembles the factors: a method reached through that
  fall-through sees those of the last call.
  """

  def __init__(self, inner: nnx.Module, pools: dict[str, GroupPools], stacked: list[MoSStackedLayer]):
    self.inner = inner
    self.names = tuple(pools)
    self.pools = nnx.List([pools[n] for n in self.names])
    self.stacked = nnx.List(stacked)

  def __getattr__(self, name: str) -> Any:
    inner = self.__dict__.get("inner")
    if inner is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(inner, name)

  def refresh(self) -> None:
    """Re-assembles every stacked layer's factors from the pools (one gather per pool)."""
    pools = dict(zip(self.names, self.pools))
    for layer in self.stacked:
      g, spec = layer.group, layer.spec
      p = pools[g.name]
      layer.set_factors(*gather_factors(p.a[...], p.b[...], spec.index_a[g.name], spec.index_b[g.name],
                                        g, spec.config.rank))

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    self.refresh()
    with calls_checked(self.inner):
      return self.inner(*args, **kwargs)


class MoSSplitLayer(MoSLayer):
  """A fused projection (Gemma's ``kv_einsum``, kernel ``(2, K, D, H)``) adapted as separate module types.

  The kernel's first axis indexes the projections it fuses (``k``, ``v``); each
  part is its own group with its own pools, as when the projections are separate
  modules (HF's ``k_proj``, ``v_proj``): ``base(x) + concat_c (α/r)·(x A_cᵀ) B_cᵀ``
  along that axis.

  Attributes:
    parts: ``(group, layer)`` of each part, in the order of the kernel's first axis.
    fused: the whole kernel's layout as a one-layer group (to flatten inputs and outputs).
  """

  def __init__(self, base: nnx.Module, pools: list[GroupPools], *, spec: AdapterSpec, parts: tuple[Group, ...],
               layers: tuple[int, ...], fused: Group, kernel_name: str, rngs: nnx.Rngs | None = None):
    super().__init__(base, None, spec=spec, group=parts[0], layer=layers[0], kernel_name=kernel_name, rngs=rngs)
    self.part_pools = nnx.List(pools)
    self.parts = tuple(parts)
    self.part_layers = tuple(layers)
    self.fused = fused

  @property
  def key(self) -> tuple[str, int]:
    return "+".join(g.name for g in self.parts), self.layer

  def pool_items(self) -> list[tuple[str, GroupPools]]:
    return [(g.name, p) for g, p in zip(self.parts, self.part_pools)]

  def part_factors(self) -> list[tuple[jax.Array, jax.Array]]:
    """Each part's ``A: (r, d_in)``, ``B: (d_out / parts, r)``."""
    spec, r = self.spec, self.spec.config.rank
    return [gather_factors(p.a[...], p.b[...], spec.index_a[g.name][i], spec.index_b[g.name][i], g, r)
            for g, i, p in zip(self.parts, self.part_layers, self.part_pools)]

  def factors(self) -> tuple[jax.Array, jax.Array]:
    raise TypeError(f"The fused module of {self.key[0]} has one (A, B) per part: use part_factors().")

  def delta(self) -> jax.Array:
    scale = self.spec.config.scale
    return jnp.stack([kernel_delta(g, a, b, scale) for g, (a, b) in zip(self.parts, self.part_factors())])

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    _record(self)
    y = self.base(x, *args, **kwargs)
    factors = self.part_factors()
    flat, unflatten = self._spec(args, kwargs).flat_io(jnp.asarray(x).astype(factors[0][0].dtype), self.fused)
    terms = [low_rank_term(flat if self.dropout is None else self.dropout(flat), a, b, self.spec.config.scale)
             for a, b in factors]
    return y + unflatten(jnp.concatenate(terms, axis=-1)).astype(y.dtype)


@contextlib.contextmanager
def calls_checked(model: nnx.Module) -> Iterator[None]:
  """Runs the block as one call of ``model``; on leaving it, every MoS layer of ``model`` must have been called.

  Costs a set of keys per Python run of the forward (under ``jit``: per trace, not per step).
  A call nested in another adapted model's call is checked by the outer one.

  Raises:
    RuntimeError: a MoS layer was not called: it would train nothing.
  """
  if _CALLED.get() is not None:
    yield
    return
  called: set = set()
  token = _CALLED.set(called)
  try:
    yield
  finally:
    _CALLED.reset(token)
  expected = {m.key: keys for keys, m in nnx.iter_modules(model) if isinstance(m, MoSLayer)}
  missed = [f"{'/'.join(map(str, keys))} ({key[0]})" for key, keys in expected.items() if key not in called]
  if missed:
    raise RuntimeError(
        f"{len(missed)} of {len(expected)} MoS layers were not called by this forward, so they would train "
        f"nothing: {missed[:6]}{' ...' if len(missed) > 6 else ''}. The model reaches these modules another "
        "way than through their attribute (a copy, a call intercepted before the wrapper, e.g. a qwix-quantized "
        "model), or does not use them in this call. Adapt only the modules the forward calls "
        "(exclude_modules), and quantize with mos_jax.nnx.adapt(model, config, quantize=...).")
