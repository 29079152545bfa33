"""An adapter's static half (:class:`AdapterSpec`) and its routing: the pool shards of each layer's ``A`` and ``B``."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Mapping

import numpy as np

from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.hashing import sha256_arrays
from mos_jax._src.core.targets import Group

#: Bumped whenever the draw below changes, so a checkpoint can tell whether
#: regenerating from the seed reproduces its routing bit-for-bit.
ROUTING_VERSION = "mos-routing-v1"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AdapterSpec:
  """The static half of an :class:`~mos_jax.Adapter`: config, groups, routing index arrays and routing version.

  Everything about an adapter except its trainable pools. Never traced: index arrays are NumPy and
  enter jitted code as constants. Equal (and hashing equal) when config, groups, version and index
  arrays are, so it is the static part of :class:`mos_jax.Adapter`'s pytree: a jitted function is not
  recompiled for a new adapter value with the same spec.

  Attributes:
    config: the adapter config.
    groups: the adapted module types.
    index_a: group name -> ``(L, r·l)`` int32 shard ids building ``A``.
    index_b: group name -> ``(L, r·l)`` int32 shard ids building ``B``.
    version: the routing algorithm that produced the indices.
  """

  config: MoSConfig
  groups: tuple[Group, ...]
  index_a: Mapping[str, np.ndarray]
  index_b: Mapping[str, np.ndarray]
  version: str = ROUTING_VERSION

  def __post_init__(self):
    # Checked once, here, however the spec was made (drawn, read from a file, built by hand): every
    # gather then trusts the ids, so an id outside its pool can never be clipped onto another shard.
    object.__setattr__(self, "groups", tuple(self.groups))
    check_indices(self)
    for name in ("index_a", "index_b"):
      object.__setattr__(self, name, {g.name: _frozen(getattr(self, name)[g.name]) for g in self.groups})

  @functools.cached_property
  def digest(self) -> str:
    """SHA-256 over every group's name and index arrays (dtype, shape and values)."""
    return sha256_arrays((g.name, index) for g in self.groups
                         for index in (self.index_a[g.name], self.index_b[g.name]))

  def __repr__(self) -> str:
    return (f"AdapterSpec({self.config!r}, groups={[g.name for g in self.groups]}, version={self.version!r}, "
            f"sha256={self.digest[:12]}...)")

  def _key(self) -> tuple:
    return (self.config, self.groups, self.version, self.digest)

  def __eq__(self, other: object) -> bool:
    return self is other or (isinstance(other, AdapterSpec) and self._key() == other._key())

  def __hash__(self) -> int:
    return hash(self._key())


def _frozen(index: np.ndarray) -> np.ndarray:
  """``index`` as a read-only int32 array (no copy when it already is one)."""
  index = np.asarray(index)
  if index.dtype == np.int32 and not index.flags.writeable:
    return index
  index = index.astype(np.int32)  # a copy: the caller's array may change, the spec's never does
  index.setflags(write=False)
  return index


def check_group(config: MoSConfig, group: Group) -> None:
  """Raises ``ValueError`` if ``config`` cannot be applied to ``group``."""
  r, r_e, r_p = config.rank, config.equivalent_rank, config.effective_private_rank
  l, n = config.effective_shards_per_vector, group.num_layers
  bad = [f"{name}={d}" for name, d in (("d_in", group.d_in), ("d_out", group.d_out)) if d % l]
  if bad:
    ok = [k for k in range(1, l + 1) if group.d_in % k == 0 and group.d_out % k == 0]
    raise ValueError(f"Group {group.name!r}: {', '.join(bad)} not divisible by shards_per_vector "
                     f"(l={l}); each vector must split into l equal shards. Use l in {ok} "
                     "or exclude this module.")
  public_draw, public_region = (r - r_p) * l, (r_e - r_p) * n * l
  if public_draw > public_region:
    raise ValueError(
        f"Group {group.name!r}: each layer draws (r - r_p)·l = ({r} - {r_p})·{l} = {public_draw} "
        f"public shards without replacement, but the public region holds only "
        f"(r_e - r_p)·L·l = ({r_e} - {r_p})·{n}·{l} = {public_region}. Lower rank to at most "
        f"{r_p + (r_e - r_p) * n}, raise equivalent_rank, or lower private_rank.")


def check_indices(spec: AdapterSpec) -> None:
  """Raises ``ValueError`` unless every index array is ``(L, r·l)`` integers within its pool.

  Run by :class:`AdapterSpec` itself, so a spec built by hand or read from an
  edited file fails when it is made, never as a gather of the wrong shards.
  """
  c = spec.config
  r, l = c.rank, c.effective_shards_per_vector
  for g in spec.groups:
    shards = c.equivalent_rank * g.num_layers * l
    for name, table in (("index_a", spec.index_a), ("index_b", spec.index_b)):
      idx = table.get(g.name) if isinstance(table, Mapping) else None
      if idx is None:
        raise ValueError(f"AdapterSpec has no {name} for group {g.name!r}.")
      idx = np.asarray(idx)
      if idx.shape != (g.num_layers, r * l) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"AdapterSpec {name}[{g.name!r}] is {idx.dtype}{idx.shape}, expected integers of shape "
                         f"(L, r·l) = ({g.num_layers}, {r * l}).")
      bad = np.argwhere((idx < 0) | (idx >= shards))
      if bad.size:
        shown = ", ".join(f"layer {i} position {j}: {idx[i, j]}" for i, j in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(
            f"AdapterSpec {name}[{g.name!r}] holds {len(bad)} shard id(s) outside the pool's [0, {shards}) "
            f"(N = r_e·L·l = {c.equivalent_rank}·{g.num_layers}·{l}): {shown}. Draw routings with "
            "mos_jax.core.make_spec, or keep every id below N.")


def _group_rng(seed: int, name: str) -> np.random.Generator:
  # Keyed by the type's name, so a group's routing does not change when other
  # modules are added to or removed from target_modules.
  return np.random.default_rng([seed, zlib.crc32(name.encode())])


def group_indices(config: MoSConfig, group: Group) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays ``(index_a, index_b)``, each ``(L, r·l)``, per spec §4.

  Layer ``i`` takes ``(r - r_p)·l`` public ids (a fresh draw without
  replacement, or the first ids when subset selection is off) followed by the
  ``r_p·l`` private ids it owns. ``A`` is drawn before ``B`` for each layer.
  """
  check_group(config, group)
  r, r_e, r_p = config.rank, config.equivalent_rank, config.effective_private_rank
  l, n = config.effective_shards_per_vector, group.num_layers
  public_region, draw = (r_e - r_p) * n * l, (r - r_p) * l
  rng = _group_rng(config.seed, group.name)

  def public() -> np.ndarray:
    if config.subset_selection:
      return rng.choice(public_region, size=draw, replace=False)
    return np.arange(draw)

  index_a, index_b = [], []
  for i in range(n):
    private = public_region + i * r_p * l + np.arange(r_p * l)
    a = np.concatenate([public(), private])
    b = np.concatenate([public(), private]) if config.pair_dissociation else a
    index_a.append(a)
    index_b.append(b)
  as_array = lambda rows: np.asarray(rows, dtype=np.int32).reshape(n, r * l)
  return as_array(index_a), as_array(index_b)


def make_spec(config: MoSConfig, groups: tuple[Group, ...]) -> AdapterSpec:
  """Draws the routing of every group from ``config.seed``: an adapter's static spec.

  Args:
    config: the adapter config.
    groups: the groups found by :func:`find_groups`.

  Returns:
    A :class:`AdapterSpec` with read-only index arrays.

  Example:
    >>> spec = make_spec(cfg, find_groups(params, cfg))  # doctest: +SKIP
  """
  index_a, index_b = {}, {}
  for g in groups:
    a, b = group_indices(config, g)
    a.setflags(write=False)
    b.setflags(write=False)
    index_a[g.name], index_b[g.name] = a, b
  return AdapterSpec(config=config, groups=tuple(groups), index_a=index_a, index_b=index_b)
