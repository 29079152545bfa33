"""Test helpers: params pytrees shaped like real models, random pools, float comparisons, the repository root."""

import contextlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mos_jax

#: The repository's root folder (tests, experiments, tpu and the README live under it).
REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def hf_numerics():
  """HF's Flax models broadcast implicitly; our own code stays strict elsewhere."""
  with jax.numpy_rank_promotion("allow"):
    yield


def layered_params(num_layers, shapes, *, stacked=False):
  """``{"layers": {"0": {name: {"kernel"}}}}`` (or one stacked ``(L, d_in, d_out)`` kernel per name).

  Stacked kernels are adapted only when declared: ``MoSConfig(stacked_modules=..., layer_axis=0)``.
  """
  if stacked:
    return {"layers": {name: {"kernel": jnp.zeros((num_layers, *s))} for name, s in shapes.items()}}
  return {"layers": {str(i): {name: {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[1:])}
                              for name, s in shapes.items()} for i in range(num_layers)}}


def random_pools(pools, seed=0, scale=1.0):
  """Replaces every pool (B included, which starts at zero) by ``scale`` times standard normal values.

  Use as ``adapter.replace(pools=random_pools(adapter.pools))``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(pools)
  rng = np.random.default_rng(seed)
  values = [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, values if scale == 1.0 else [scale * v for v in values])


#: The adapter config of the file and export tests: every projection, private and shared shards, l = 2.
EXPORT_CONFIG = mos_jax.MoSConfig(rank=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, alpha=8.0)
#: Token ids for the tiny HF models' forwards (vocabulary 64).
TOKEN_IDS = np.random.default_rng(0).integers(0, 64, size=(2, 9)).astype(np.int32)


def trained_adapter(params, config, seed=3):
  """``mos_jax.adapt(params, config)`` with small random pools (B included), as after some training."""
  adapter = mos_jax.adapt(params, config)
  return adapter.replace(pools=random_pools(adapter.pools, seed=seed, scale=0.1))


_INJECTED = {}


def injected_logits(model, params, adapter, ids=TOKEN_IDS):
  """An HF Flax model's logits with ``adapter`` injected, jitted once per model (eager: seconds per call)."""
  if id(model) not in _INJECTED:
    def run(params, adapter, ids):
      with mos_jax.linen.inject(adapter), hf_numerics():
        return model(ids, params=params).logits
    _INJECTED[id(model)] = (model, jax.jit(run))  # the model is kept alive, so its id stays its own
  return np.asarray(_INJECTED[id(model)][1](params, adapter, jnp.asarray(ids)))


def rel_err(actual, desired):
  """Largest absolute difference relative to the largest magnitude of ``desired`` (float64).

  The measure every float oracle here uses: XLA sums in another order on another CPU (or
  thread count), so an element near zero may differ by a few ulps of the array's scale, not
  of its own value; a per-element relative test would fail there on a correct result.
  """
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert a.shape == d.shape, f"shapes differ: {a.shape} vs {d.shape}"
  return float(np.abs(a - d).max(initial=0.0) / max(np.abs(d).max(initial=0.0), 1e-30))


def assert_close(actual, desired, rtol=1e-5):
  """Asserts ``rel_err(actual, desired) <= rtol``; trees are compared leaf by leaf."""
  flat_a, tree_a = jax.tree_util.tree_flatten(actual)
  flat_d, tree_d = jax.tree_util.tree_flatten(desired)
  assert tree_a == tree_d, f"tree structures differ: {tree_a} vs {tree_d}"
  for i, (a, d) in enumerate(zip(flat_a, flat_d)):
    err = rel_err(a, d)
    assert err <= rtol, f"leaf {i}: max |actual - desired| / max |desired| = {err:.3g} > {rtol:g}"


def assert_trees_equal(a, b):
  """Same structure, dtypes and bits (typed PRNG keys compared through their key data)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def folder_entries(folder):
  """A folder's entries but mos_jax's documented writer lock files (``.writer.lock``, ``.<export>.lock``), sorted."""
  return sorted(p.name for p in Path(folder).iterdir() if not (p.name.startswith(".") and p.name.endswith(".lock")))


def checkpoint_entries(folder):
  """A checkpoint folder's entries but the writer's lock file (``.writer.lock``, documented), sorted."""
  return folder_entries(folder)


#: Files written by mos_jax at commit 7eb9147, before the ``_src`` restructure renamed ``Routing`` to
#: ``AdapterSpec`` (an adapter file and a training checkpoint of :func:`pre_restructure_adapter`); the
#: script that wrote them is in ``tests/data/7eb9147/README.md``.
PRE_RESTRUCTURE = REPO_ROOT / "tests" / "data" / "7eb9147"


def pre_restructure_adapter():
  """``(params, adapter)``: what the files in :data:`PRE_RESTRUCTURE` hold, rebuilt with today's code."""
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}, "up": {"kernel": jnp.zeros((8, 6))}}
                       for i in range(3)},
            "stack": {"w": {"kernel": jnp.zeros((2, 4, 8))}}}
  config = mos_jax.MoSConfig(rank=3, equivalent_rank=2, private_rank=1, shards_per_vector=2, alpha=8.0, seed=3,
                             target_modules=("q_proj", "up", "w"), stacked_modules=("w",))
  adapter = mos_jax.adapt(params, config)
  rng = np.random.default_rng(7)
  pools = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapter.pools)
  return params, adapter.replace(pools=pools)


def full_width_upcasts(fn, *args, min_size):
  """The converts from bfloat16 to float32 of arrays of at least ``min_size`` elements in ``fn``'s lowered
  StableHLO, as their shapes (mixed-dtype products convert their narrow operand there)."""
  hlo = jax.jit(fn).lower(*args).as_text()
  shapes = re.findall(r"stablehlo.convert %\S+ : \(tensor<([\dx]+)xbf16>\) -> tensor<[\dx]+xf32>", hlo)
  return [s for s in shapes if np.prod([int(d) for d in s.split("x")]) >= min_size]
