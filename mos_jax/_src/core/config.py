"""Static configuration of a Mixture-of-Shards adapter."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Sequence

import numpy as np

#: The seven projections of a LLaMA-family decoder block (the paper's setting).
LLAMA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
#: Every attention and MLP dense layer of a HF Flax BERT encoder.
BERT_TARGETS: str = (
    r".*layer/\d+/(attention/self/(query|key|value)|attention/output/dense"
    r"|intermediate/dense|output/dense)"
)


#: Seeds feed ``jax.random.key``, which (without x64) keeps 32 bits: 2**32 would collide with 0.
_MAX_SEED = 2**32
_POOL_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _as_int(value: Any, field: str, low: int, high: int | None, kind: str) -> int:
  """A Python or NumPy integer (never a bool, float or str) in ``[low, high)``, as ``int``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
      or not low <= int(value) < (high if high is not None else int(value) + 1):
    raise ValueError(f"MoSConfig.{field} must be {kind}, got {value!r} ({type(value).__name__}).")
  return int(value)


def _as_float(value: Any, field: str) -> float:
  """A finite real number (Python or NumPy; never a bool or str), as ``float``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"MoSConfig.{field} must be a number, got {value!r} ({type(value).__name__}).")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"MoSConfig.{field} must be finite, got {value}.")
  return value


def _as_bool(value: Any, field: str) -> bool:
  # Strict: "no" or 0 would otherwise read as a switch left on (or off) by accident.
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"MoSConfig.{field} must be True or False, got {value!r} ({type(value).__name__}).")
  return bool(value)


def _as_dtype_name(value: Any) -> str:
  try:
    # "float32", np.float32, np.dtype, jnp.bfloat16 alike; never None, which NumPy reads as float64.
    name = None if value is None else np.dtype(value).name
  except TypeError:
    name = None
  if name not in _POOL_DTYPES:
    raise ValueError(f"MoSConfig.pool_dtype must be a float dtype ({', '.join(_POOL_DTYPES)}), "
                     f"got {value!r}.")
  return name


def _as_patterns(value: str | Sequence[str] | None, field: str) -> str | tuple[str, ...] | None:
  if value is None or isinstance(value, str):
    if isinstance(value, str):
      try:
        re.compile(value)
      except re.error as e:
        raise ValueError(f"MoSConfig.{field}={value!r} is not a valid regex: {e}") from e
    return value
  if isinstance(value, (set, frozenset)):
    # A set (PEFT's LoraConfig stores target_modules as one) iterates in hash order, which changes from
    # process to process: sorted, the config, its identity and every checkpoint of it are the same everywhere.
    if not all(isinstance(v, str) for v in value):
      raise ValueError(f"MoSConfig.{field} must be a regex string or a list of non-empty "
                       f"module names / path suffixes, got {value!r}")
    value = sorted(value)
  value = tuple(value)
  if not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"MoSConfig.{field} must be a regex string or a list of non-empty "
                     f"module names / path suffixes, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoSConfig:
  """Hyper-parameters of a MoS adapter (paper symbols in brackets).

  Args:
    rank: active rank of every adapted layer [r].
    equivalent_rank: parameter budget: as many trainable parameters as LoRA of
      this rank [r_e].
    private_rank: rank-vectors private to each layer [r_p].
    shards_per_vector: shards concatenated into one rank vector [l].
    alpha: LoRA alpha; the low-rank term is scaled by ``alpha / rank``.
    dropout: dropout rate on the adapter's input (training only).
    target_modules: list of module names or "/"-path suffixes
      (``"q_proj"``, ``"attention/output/dense"``), or one regex matched with
      ``fullmatch`` against "/"-joined module paths (``"model/layers/0/mlp/up_proj"``).
      A set (as PEFT's ``LoraConfig`` stores it) is stored sorted, so the config is
      the same in every process. Each listed name must match a kernel of the model
      (``adapt`` raises naming the ones that match nothing).
    exclude_modules: same forms as ``target_modules``; matches are dropped.
    stacked_modules: same forms; matched kernels are stacks of layers (from
      ``nn.scan``/``nnx.scan``), one layer per index of axis ``layer_axis``.
      Declared, never inferred from a kernel's rank.
    layer_axis: the layer axis of stacked kernels (0, or 1 as in MaxText).
    seed: seeds both the routing draw and the pool initialisation; in
      ``[0, 2**32)``.
    subset_selection: each layer draws its own public shards (else all layers
      take the first public ids, in order).
    pair_dissociation: ``A`` and ``B`` indices are drawn independently (else
      ``B`` reuses ``A``'s).
    vector_sharding: use ``shards_per_vector`` (else ``l = 1``).
    shard_privatization: use ``private_rank`` (else ``r_p = 0``).
    pool_dtype: dtype of the trainable pools (float32 even with a bf16 base);
      a name, NumPy dtype or JAX dtype, stored as its name (never ``None``).
      ``"float64"`` pools need JAX's 64-bit mode (``jax_enable_x64``): without
      it, creating or loading them raises instead of silently making float32.

  Every field is validated and normalised at construction: NumPy integers,
  floats, booleans and dtypes become Python values (so the config is always
  JSON-serialisable); switches must be real booleans; ``alpha`` must be finite
  and positive. A bad value raises ``ValueError`` naming the field.

  Example:
    >>> cfg = MoSConfig(rank=8, equivalent_rank=1, private_rank=0, shards_per_vector=2)
    >>> cfg.scale
    2.0
  """

  rank: int
  equivalent_rank: int
  private_rank: int = 0
  shards_per_vector: int = 1
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: str | tuple[str, ...] = LLAMA_TARGETS
  exclude_modules: str | tuple[str, ...] | None = None
  stacked_modules: str | tuple[str, ...] | None = None
  layer_axis: int = 0
  seed: int = 0
  subset_selection: bool = True
  pair_dissociation: bool = True
  vector_sharding: bool = True
  shard_privatization: bool = True
  pool_dtype: str = "float32"

  def __post_init__(self):
    # Every field is checked and normalised here (NumPy scalars and dtypes become Python
    # values), so a bad value fails at construction, not when the adapter is saved.
    def put(name, value):
      object.__setattr__(self, name, value)

    for name in ("target_modules", "exclude_modules", "stacked_modules"):
      put(name, _as_patterns(getattr(self, name), name))
    if self.target_modules is None or self.target_modules == ():
      raise ValueError("MoSConfig.target_modules is empty: name the modules to adapt, "
                       "e.g. target_modules=('q_proj', 'v_proj') or a regex.")
    for name in ("rank", "equivalent_rank", "shards_per_vector"):
      put(name, _as_int(getattr(self, name), name, 1, None, "a positive integer"))
    put("private_rank", _as_int(self.private_rank, "private_rank", 0, None, "an integer >= 0"))
    put("layer_axis", _as_int(self.layer_axis, "layer_axis", 0, 2,
                              "0 or 1 (the layer axis of stacked kernels)"))
    put("seed", _as_int(self.seed, "seed", 0, _MAX_SEED, "an integer in [0, 2**32)"))
    for name in ("subset_selection", "pair_dissociation", "vector_sharding", "shard_privatization"):
      put(name, _as_bool(getattr(self, name), name))
    put("alpha", _as_float(self.alpha, "alpha"))
    if self.alpha <= 0:
      raise ValueError(f"MoSConfig.alpha must be > 0 (the term is scaled by alpha / rank), got {self.alpha}.")
    put("dropout", _as_float(self.dropout, "dropout"))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"MoSConfig.dropout must be in [0, 1), got {self.dropout!r}")
    put("pool_dtype", _as_dtype_name(self.pool_dtype))
    r, r_e, r_p = self.rank, self.equivalent_rank, self.effective_private_rank
    if r_p > r_e:
      raise ValueError(f"private_rank (r_p={r_p}) > equivalent_rank (r_e={r_e}): the private "
                       "region cannot exceed the budget; lower private_rank or raise equivalent_rank.")
    if r_p > r:
      raise ValueError(f"private_rank (r_p={r_p}) > rank (r={r}): a layer cannot own more "
                       "private vectors than it uses; lower private_rank.")
    if r_p == r_e and r != r_e:
      raise ValueError(f"private_rank == equivalent_rank ({r_e}) leaves no public pool, so rank "
                       f"must equal {r_e} (plain LoRA), got rank={r}.")

  @property
  def effective_shards_per_vector(self) -> int:
    """``l`` after the vector-sharding switch."""
    return self.shards_per_vector if self.vector_sharding else 1

  @property
  def effective_private_rank(self) -> int:
    """``r_p`` after the shard-privatization switch."""
    return self.private_rank if self.shard_privatization else 0

  @property
  def scale(self) -> float:
    """``alpha / rank``: the factor on the low-rank term."""
    return self.alpha / self.rank

  @classmethod
  def lora(cls, rank: int, **kwargs) -> "MoSConfig":
    """Plain LoRA of rank ``rank`` expressed as a MoS config (``r = r_e = r_p``).

    Example:
      >>> MoSConfig.lora(8, alpha=16.0).equivalent_rank
      8
    """
    return cls(**{"shards_per_vector": 1, **kwargs, "rank": rank, "equivalent_rank": rank,
                  "private_rank": rank})

  @classmethod
  def pure_sharing(cls, equivalent_rank: int, num_layers: int, **kwargs) -> "MoSConfig":
    """The paper's pure-sharing baseline: every layer uses the whole pool.

    All four strategies off, ``r = r_e * L``: each layer's ``A, B`` are the same
    rank-``r_e·L`` factors, with LoRA(``r_e``)'s parameter count.

    Example:
      >>> MoSConfig.pure_sharing(1, num_layers=6).rank
      6
    """
    return cls(**{"private_rank": 0, "shards_per_vector": 1, "subset_selection": False,
                  "pair_dissociation": False, "vector_sharding": False,
                  "shard_privatization": False, **kwargs,
                  "rank": equivalent_rank * num_layers, "equivalent_rank": equivalent_rank})
