import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mos_jax import MoSConfig
from mos_jax.core import LLAMA_TARGETS
from oracles.helpers import REPO_ROOT


def test_lora_and_pure_sharing_constructors():
  lora = MoSConfig.lora(8, alpha=16.0)
  assert (lora.rank, lora.equivalent_rank, lora.effective_private_rank,
          lora.effective_shards_per_vector) == (8, 8, 8, 1)
  pure = MoSConfig.pure_sharing(2, num_layers=6)
  assert pure.rank == 12 and pure.effective_private_rank == 0
  assert not (pure.subset_selection or pure.pair_dissociation)


def test_switches_override_private_rank_and_shards():
  cfg = MoSConfig(rank=8, equivalent_rank=2, private_rank=1, shards_per_vector=4,
                  vector_sharding=False, shard_privatization=False)
  assert cfg.effective_shards_per_vector == 1 and cfg.effective_private_rank == 0
  assert cfg.scale == 16.0 / 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=8, equivalent_rank=1, private_rank=2), r"private_rank \(r_p=2\) > equivalent_rank"),
    (dict(rank=1, equivalent_rank=4, private_rank=2), r"private_rank \(r_p=2\) > rank"),
    (dict(rank=8, equivalent_rank=2, private_rank=2), "no public pool"),
    (dict(rank=0, equivalent_rank=1), "rank must be a positive integer"),
    (dict(rank=4, equivalent_rank=1, shards_per_vector=0), "shards_per_vector must be a positive"),
    (dict(rank=4, equivalent_rank=1, dropout=1.0), "dropout"),
    (dict(rank=4, equivalent_rank=1, target_modules=()), "target_modules is empty"),
    (dict(rank=4, equivalent_rank=1, target_modules="q_proj("), "not a valid regex"),
    (dict(rank=4, equivalent_rank=1, pool_dtype="int8"), "pool_dtype"),
    (dict(rank=4, equivalent_rank=1, layer_axis=2), "layer_axis must be 0 or 1"),
    (dict(rank=4, equivalent_rank=1, stacked_modules="q_proj("), "stacked_modules.*not a valid regex"),
])
def test_invalid_configs_fail_fast(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MoSConfig(**kwargs)


def test_config_is_frozen_and_hashable():
  cfg = MoSConfig(rank=4, equivalent_rank=1, target_modules=["q_proj"])
  assert cfg.target_modules == ("q_proj",)
  assert cfg.stacked_modules is None and cfg.layer_axis == 0  # nothing is a stack unless declared
  assert MoSConfig(rank=4, equivalent_rank=1, stacked_modules=["q_proj"]).stacked_modules == ("q_proj",)
  assert hash(cfg) == hash(MoSConfig(rank=4, equivalent_rank=1, target_modules=("q_proj",)))
  with pytest.raises(AttributeError):
    cfg.rank = 2


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed", "0", "seed must be an integer"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", 2**63, "seed must be an integer"),
    ("seed", 2**32, "seed must be an integer"),  # jax.random.key would fold it onto seed 0
    ("seed", True, "seed must be an integer"),
    ("rank", 4.0, "rank must be a positive integer"),
    ("alpha", float("nan"), "alpha must be finite"),
    ("alpha", float("inf"), "alpha must be finite"),
    ("alpha", "16", "alpha must be a number"),
    ("alpha", None, "alpha must be a number"),
    ("alpha", 0.0, "alpha must be > 0"),
    ("alpha", True, "alpha must be a number"),
    ("dropout", "0.1", "dropout must be a number"),
    ("subset_selection", "no", "subset_selection must be True or False"),
    ("pair_dissociation", 1, "pair_dissociation must be True or False"),
    ("vector_sharding", None, "vector_sharding must be True or False"),
    ("shard_privatization", "False", "shard_privatization must be True or False"),
    ("pool_dtype", np.dtype("int32"), "pool_dtype must be a float dtype"),
    ("pool_dtype", "f32x", "pool_dtype must be a float dtype"),
    ("pool_dtype", None, "pool_dtype must be a float dtype"),  # issue 20.13: NumPy reads None as float64
])
def test_every_field_is_validated_and_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    MoSConfig(**{"rank": 4, "equivalent_rank": 1, field: value})


def test_numpy_values_are_normalised_to_json_types():
  import jax.numpy as jnp
  cfg = MoSConfig(rank=np.int64(4), equivalent_rank=np.int32(1), private_rank=np.int8(0), seed=np.int64(3),
                  alpha=np.float32(16.0), dropout=np.float64(0.1), subset_selection=np.bool_(True),
                  pool_dtype=np.dtype("float32"), layer_axis=np.int64(1))
  fields = dataclasses.asdict(cfg)
  json.dumps(fields)  # the old failure: "int64 is not JSON serializable" at save time
  assert type(cfg.seed) is int and cfg.seed == 3 and type(cfg.rank) is int and type(cfg.layer_axis) is int
  assert type(cfg.alpha) is float and type(cfg.subset_selection) is bool and cfg.pool_dtype == "float32"
  assert MoSConfig(rank=4, equivalent_rank=1, pool_dtype=jnp.bfloat16).pool_dtype == "bfloat16"
  assert MoSConfig(rank=4, equivalent_rank=1, pool_dtype=np.float16).pool_dtype == "float16"
  # Normalised values compare and hash equal to the plain ones: one routing, one compiled step.
  assert cfg == MoSConfig(rank=4, equivalent_rank=1, seed=3, dropout=0.1, layer_axis=1, alpha=16)


def test_numpy_config_survives_adapt_and_save(tmp_path):
  import jax.numpy as jnp
  import mos_jax
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((8, 8))}} for i in range(2)}}
  cfg = MoSConfig(rank=np.int64(2), equivalent_rank=np.int64(1), seed=np.int64(3), pool_dtype=np.dtype("float32"),
                  target_modules=["q_proj"])
  adapter = mos_jax.adapt(params, cfg)
  mos_jax.save_adapter(tmp_path / "a.safetensors", adapter)
  assert mos_jax.load_adapter(tmp_path / "a.safetensors").config == cfg


SET_TARGETS = textwrap.dedent("""
    import json, jax.numpy as jnp, mos_jax
    from mos_jax.core import LLAMA_TARGETS
    params = {"layers": {str(i): {n: {"kernel": jnp.ones((8, 8))} for n in LLAMA_TARGETS} for i in range(2)}}
    config = mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=set(LLAMA_TARGETS))
    print(json.dumps([list(config.target_modules), mos_jax.train.adapter_identity(mos_jax.adapt(params, config))]))
""")


def test_target_modules_given_as_a_set_are_the_same_config_in_every_process():
  """Issue 20.6: a set kept its hash order, so a resumed run in a new process "did not belong to this run"."""
  outputs = set()
  for seed in ("0", "1", "2", "3"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", SET_TARGETS], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs.add(proc.stdout.strip().splitlines()[-1])
  assert len(outputs) == 1, outputs
  (targets, _), = (json.loads(o) for o in outputs)
  assert targets == sorted(LLAMA_TARGETS)
  assert MoSConfig(rank=4, equivalent_rank=1, target_modules={"v_proj", "q_proj"}).target_modules == \
      ("q_proj", "v_proj")
  assert MoSConfig(rank=4, equivalent_rank=1, target_modules=frozenset({"v_proj", "q_proj"})) == \
      MoSConfig(rank=4, equivalent_rank=1, target_modules=["q_proj", "v_proj"])


def test_float64_pools_without_x64_are_refused_with_the_fix(tmp_path):
  """Issue 20.13: float64 pools silently became float32 when JAX's 64-bit mode is off."""
  import jax
  import jax.numpy as jnp
  import mos_jax
  assert not jax.config.read("jax_enable_x64")
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((8, 8))}} for i in range(2)}}
  config = MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"], pool_dtype="float64")
  with pytest.raises(ValueError, match=r"pool_dtype='float64' needs JAX's 64-bit mode.*jax_enable_x64"):
    mos_jax.adapt(params, config)
  # A float64 adapter file (written by a process with x64 on) is refused the same way, not loaded as float32.
  spec = mos_jax.core.make_spec(config, mos_jax.core.find_groups(params, config))
  pools = {g.name: {"A": np.ones((2, 8)), "B": np.zeros((2, 8))} for g in spec.groups}
  mos_jax.save_adapter(tmp_path / "a64.safetensors", mos_jax.Adapter(pools=pools, spec=spec))
  with pytest.raises(ValueError, match=r"a64.safetensors: pool_dtype='float64' needs JAX's 64-bit mode"):
    mos_jax.load_adapter(tmp_path / "a64.safetensors")
