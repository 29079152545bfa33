"""The trainable shard pools: one ``(P_A, P_B)`` pair per module type."""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.routing import AdapterSpec
from mos_jax._src.core.targets import Group

Pools = dict[str, dict[str, jax.Array]]


def pool_shapes(config: MoSConfig, groups: Sequence[Group]) -> dict[str, dict[str, tuple[int, int]]]:
  """Group name -> ``{"A": (N, d_in/l), "B": (N, d_out/l)}`` with ``N = r_e·L·l``."""
  l = config.effective_shards_per_vector
  return {g.name: {"A": (config.equivalent_rank * g.num_layers * l, g.d_in // l),
                   "B": (config.equivalent_rank * g.num_layers * l, g.d_out // l)} for g in groups}


def require_dtype(pool_dtype: str, what: str) -> None:
  """Raises ``ValueError`` if JAX cannot hold pools of ``pool_dtype`` (float64 without 64-bit mode).

  Without ``jax_enable_x64`` JAX turns every float64 array into float32 without a word, so a
  float64 adapter would train, save and resume in float32 while its config says float64.
  """
  if jnp.dtype(pool_dtype).itemsize == 8 and not jax.config.read("jax_enable_x64"):
    raise ValueError(f"{what}: pool_dtype={pool_dtype!r} needs JAX's 64-bit mode, which is off, so JAX would "
                     "silently make the pools float32. Call jax.config.update('jax_enable_x64', True) at start-up "
                     "(before any array is created), or use pool_dtype='float32'.")


def init_pools(spec: AdapterSpec) -> Pools:
  """Initialises the pools as the authors do.

  ``P_A ~ U(-1/√d_in, 1/√d_in)`` (PyTorch's ``kaiming_uniform_(a=√5)`` with the
  full vector length as fan-in) and ``P_B = 0``, so ``ΔW = 0`` at step 0.

  Args:
    spec: the adapter's spec; its config gives seed and ``pool_dtype``.

  Returns:
    ``{group name: {"A": P_A, "B": P_B}}``.

  Raises:
    ValueError: ``pool_dtype`` is float64 and JAX's 64-bit mode is off.

  Example:
    >>> pools = init_pools(spec)  # doctest: +SKIP
  """
  config = spec.config
  require_dtype(config.pool_dtype, "init_pools")
  dtype = jnp.dtype(config.pool_dtype)
  shapes = pool_shapes(config, spec.groups)
  root = jax.random.key(config.seed)
  pools = {}
  for g in spec.groups:
    key = jax.random.fold_in(root, zlib.crc32(g.name.encode()) & 0x7FFFFFFF)
    bound = 1.0 / (g.d_in ** 0.5)
    pools[g.name] = {
        "A": jax.random.uniform(key, shapes[g.name]["A"], dtype, -bound, bound),
        "B": jnp.zeros(shapes[g.name]["B"], dtype),
    }
  return pools


def check_pools(pools: Any, spec: AdapterSpec) -> None:
  """Raises ``ValueError`` unless ``pools`` has exactly the structure ``spec`` gives."""
  if not isinstance(pools, dict):
    raise ValueError(f"Expected pools as a dict {{group: {{'A', 'B'}}}}, got {type(pools).__name__}. "
                     "Pass the adapter's pools, not the model params or the factors.")
  expected = pool_shapes(spec.config, spec.groups)
  if set(pools) != set(expected):
    missing, extra = sorted(set(expected) - set(pools)), sorted(set(pools) - set(expected))
    raise ValueError(f"Pools do not match this adapter spec: missing groups {missing}, unexpected "
                     f"{extra}. Pass the pools created with this spec (same params, config).")
  for name, shapes in expected.items():
    entry = pools[name]
    if not isinstance(entry, dict) or set(entry) != {"A", "B"}:
      raise ValueError(f"Pools[{name!r}] must be {{'A': P_A, 'B': P_B}}, got "
                       f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}.")
    for factor, shape in shapes.items():
      got = tuple(getattr(entry[factor], "shape", ()))
      if got != shape:
        raise ValueError(f"Pools[{name!r}][{factor!r}] has shape {got}, expected {shape} "
                         f"(N = r_e·L·l = {shape[0]} shards of length {shape[1]}). Were these "
                         "pools made with another config or model?")
      if not jnp.issubdtype(entry[factor].dtype, jnp.floating):
        raise ValueError(f"Pools[{name!r}][{factor!r}] has dtype {entry[factor].dtype}; "
                         "pools must be floating point.")
