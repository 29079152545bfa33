"""Orbax training checkpoints (TrainCheckpointer): round trips, retention, resharding, identity, corruption, crashes."""

import dataclasses
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from transformers import FlaxLlamaForCausalLM, LlamaConfig

from mos_jax import CorruptError, MismatchError, MoSConfig, adapt
from mos_jax.train import TrainCheckpointer, adapter_identity
from oracles.helpers import (PRE_RESTRUCTURE, REPO_ROOT, assert_trees_equal, checkpoint_entries, hf_numerics,
                             pre_restructure_adapter, random_pools)


# Reading damaged files makes TensorStore complete futures after Orbax closed their event loop;
# asyncio reports that as an unraisable "Event loop is closed" error. Nothing is lost.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

QUARANTINE = "corrupt"  # TrainCheckpointer's folder for unreadable steps (its documented <directory>/corrupt/)
LOCK = ".writer.lock"  # its documented writer lock file
MOS = MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2)  # N = 1·4·2 = 8 shards: splits over 8 devices


def train_state(adapter, seed=0):
  """Pools, an AdamW state that has seen a step (non-zero moments), a key and a counter."""
  pools = random_pools(adapter.pools, seed)
  opt = optax.adamw(1e-2)
  opt_state = opt.init(pools)
  grads = random_pools(pools, seed + 1)
  updates, opt_state = opt.update(grads, opt_state, pools)
  return {"pools": optax.apply_updates(pools, updates), "opt_state": opt_state,
          "rng": jax.random.key(seed + 7), "step": jnp.asarray(3, jnp.int32)}


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama):
  return adapt(tiny_llama.params, MOS)


def checkpointer(path, adapter, params=None, **kw):
  return TrainCheckpointer(path, identity={"adapter": adapter_identity(adapter, base_params=params)}, **kw)


def test_save_restore_gives_identical_pytrees(llama_adapter, tmp_path):
  state = train_state(llama_adapter)
  data = {"position": 3, "rng": {"state": 2**100 + 5}}  # big ints, as NumPy generator states have
  with checkpointer(tmp_path, llama_adapter) as ckpt:
    assert ckpt.save(3, state, data_state=data)
    ckpt.wait()
    blank = jax.tree_util.tree_map(jnp.zeros_like, state)
    restored = ckpt.restore(blank)
  assert restored.step == 3 and restored.data_state == data
  assert_trees_equal(restored.state, state)
  assert jax.random.key_impl(restored.state["rng"]) == jax.random.key_impl(state["rng"])


def test_saves_every_n_and_keeps_the_last_k(llama_adapter, tmp_path):
  state = train_state(llama_adapter)
  with checkpointer(tmp_path, llama_adapter, save_every=2, keep=2) as ckpt:
    started = [ckpt.save(s, state) for s in range(1, 8)]
    ckpt.wait()
    assert started == [False, True, False, True, False, True, False]
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.save(7, state, force=True)  # e.g. on SIGTERM or at the last step
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
  assert checkpoint_entries(tmp_path) == ["6", "7"]


@pytest.mark.parametrize("saved, restored", [(P(), P("x")), (P("x"), P())])
def test_restores_onto_another_sharding(llama_adapter, tmp_path, saved, restored):
  mesh = Mesh(np.array(jax.devices()), ("x",))
  assert mesh.size == 8

  def placed(tree, spec):
    # Pools and moments (N = 8 rows) split along axis 0; scalars and keys replicated.
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.ndim == 2 else P())), tree)

  state = placed(train_state(llama_adapter), saved)
  with checkpointer(tmp_path, llama_adapter) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, restored if x.ndim == 2 else P())), state)
    out = ckpt.restore(like).state
  assert_trees_equal(out, state)
  pool = out["pools"][llama_adapter.groups[0].name]["A"]
  assert pool.sharding.spec == restored
  assert len({s.data.shape for s in pool.addressable_shards}) == 1
  assert pool.addressable_shards[0].data.shape[0] == (1 if restored == P("x") else 8)


def test_refuses_another_seed_config_or_model(tiny_llama, llama_adapter, tmp_path):
  params = tiny_llama.params
  state = train_state(llama_adapter)
  with checkpointer(tmp_path, llama_adapter, params) as ckpt:
    ckpt.save(1, state)

  other_seed = adapt(params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, seed=1))
  with checkpointer(tmp_path, other_seed, params) as ckpt:
    with pytest.raises(MismatchError) as err:
      ckpt.restore(state)
  assert "mos_config.seed: the checkpoint has 0, this run has 1" in str(err.value)
  assert "routing_sha256" in str(err.value)

  # Same seed, another budget: config and the pool shapes both differ.
  bigger = adapt(params, MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2))
  with checkpointer(tmp_path, bigger, params) as ckpt:
    with pytest.raises(MismatchError) as err:
      ckpt.restore(train_state(bigger))
  message = str(err.value)
  assert "mos_config.equivalent_rank: the checkpoint has 1, this run has 2" in message
  assert "state[opt_state/0/mu/model/layers/*/self_attn/q_proj/A]: the checkpoint has [[8, 16], 'float32'], " \
         "this run has [[16, 16], 'float32']" in message
  assert "... and 24 more" in message  # 2 identity lines + 14 pools x (pools, mu, nu) = 44, 20 shown

  with hf_numerics():
    wider = FlaxLlamaForCausalLM(LlamaConfig(**{**tiny_llama.config.to_dict(), "hidden_size": 64}), seed=0)
  other_model = adapt(wider.params, MOS)
  with checkpointer(tmp_path, other_model, wider.params) as ckpt:
    with pytest.raises(MismatchError) as err:
      ckpt.restore(train_state(other_model))
  message = str(err.value)
  assert "groups[model/layers/*/self_attn/q_proj].kernel_shape: the checkpoint has [32, 32], this run has [64, 64]" \
      in message
  assert "base_model[model/embed_tokens/embedding]: the checkpoint has [[64, 32], 'float32'], " \
         "this run has [[64, 64], 'float32']" in message
  # Refusals never move or delete the (good) checkpoint.
  assert checkpoint_entries(tmp_path) == ["1"]


@pytest.mark.parametrize("change", [{"seed": 1}, {"alpha": 32.0}, {"rank": 2}, {"pair_dissociation": False}],
                         ids=["seed", "alpha", "rank", "strategy"])
def test_an_adapter_of_another_spec_is_refused_whatever_identity_the_caller_passed(tiny_llama, tmp_path, change):
  """The identity of every Adapter in the state is the checkpointer's own business (issue 20, item 7).

  The other adapter's pools have the same shapes, so without it the saved pools would be paired silently
  with another routing (or scale) when the caller's identity says nothing about the adapter.
  """
  saved = adapt(tiny_llama.params, MOS)
  other = adapt(tiny_llama.params, dataclasses.replace(MOS, **change))
  assert jax.tree_util.tree_map(jnp.shape, other.pools) == jax.tree_util.tree_map(jnp.shape, saved.pools)
  state = {"adapter": saved.replace(pools=random_pools(saved.pools)), "step": jnp.asarray(1)}
  with TrainCheckpointer(tmp_path, identity={}) as ckpt:
    ckpt.save(1, state, force=True)
  with TrainCheckpointer(tmp_path, identity={}, read_only=True) as ckpt:  # the writer's (empty) identity
    with pytest.raises(MismatchError) as err:
      ckpt.restore({**state, "adapter": other})
    (field, value), = change.items()
    saved_value = getattr(MOS, field)
    assert f"adapters.adapter.mos_config.{field}: the checkpoint has {saved_value!r}, this run has {value!r}" \
        in str(err.value)
    assert_trees_equal(ckpt.restore(state).state, state)  # the same adapter restores
  assert checkpoint_entries(tmp_path) == ["1"]


def test_adapters_are_found_anywhere_in_the_state(tiny_llama, tmp_path):
  saved = adapt(tiny_llama.params, MOS)
  other = adapt(tiny_llama.params, dataclasses.replace(MOS, seed=2))
  state = {"trainable": {"adapter": saved, "head": jnp.ones(3)}, "opt_state": optax.adam(1e-3).init(saved)}
  with TrainCheckpointer(tmp_path, identity={}) as ckpt:
    ckpt.save(1, state, force=True)
    ckpt.wait()
    with pytest.raises(MismatchError, match=r"adapters\[trainable/adapter\]\.mos_config\.seed"):
      ckpt.restore({**state, "trainable": {"adapter": other, "head": jnp.ones(3)}})


def _delete_arrays(step_dir):
  shutil.rmtree(step_dir / "state" / "d")


def _truncate_arrays(step_dir):
  for f in (step_dir / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_metadata(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"format": "mos_jax.train_checkp')


def _swap_in_other_arrays(step_dir):
  # Files that read back fine but hold another step's values (e.g. a half-synced copy):
  # only the checksum can tell.
  shutil.rmtree(step_dir / "state")
  shutil.copytree(step_dir.parent / "2" / "state", step_dir / "state")


@pytest.mark.parametrize("damage", [_delete_arrays, _truncate_arrays, _garble_metadata, _swap_in_other_arrays])
def test_damaged_latest_step_falls_back_to_the_previous(llama_adapter, tmp_path, caplog, damage):
  states = {s: train_state(llama_adapter, seed=s) for s in (2, 4)}
  with checkpointer(tmp_path, llama_adapter) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, data_state={"position": s})
  damage(tmp_path / "4")

  with checkpointer(tmp_path, llama_adapter) as ckpt:
    assert ckpt.all_steps() == [2, 4]  # the damage is only visible on reading
    with pytest.raises(CorruptError, match="Step 4"):
      ckpt.restore(states[4], step=4)  # an explicit step never falls back
    with caplog.at_level(logging.WARNING, logger="mos_jax"):
      restored = ckpt.restore(states[4])
    assert restored.step == 2 and restored.data_state == {"position": 2}
    assert_trees_equal(restored.state, states[2])
    assert "step 4" in caplog.text and "unreadable" in caplog.text
    # The damaged step is set aside, not deleted, and training can save step 4 again.
    assert ckpt.all_steps() == [2]
    assert [p.name.split("-")[0] for p in (tmp_path / QUARANTINE).iterdir()] == ["4"]
    ckpt.save(4, states[4], force=True)
    ckpt.wait()
    assert_trees_equal(ckpt.restore(states[4]).state, states[4])


def test_every_step_damaged_raises(llama_adapter, tmp_path):
  state = train_state(llama_adapter)
  with checkpointer(tmp_path, llama_adapter) as ckpt:
    ckpt.save(1, state)
  _delete_arrays(tmp_path / "1")
  with checkpointer(tmp_path, llama_adapter) as ckpt:
    with pytest.raises(CorruptError, match="No checkpoint .* could be restored"):
      ckpt.restore(state)
    assert ckpt.all_steps() == [1]  # nothing was proven good, so nothing is set aside


CRASH_SCRIPT = """
import os
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import async_path
from mos_jax.train import TrainCheckpointer

state = {{"pools": jnp.arange(64.0).reshape(16, 4), "rng": jax.random.key(0)}}
ckpt = TrainCheckpointer({path!r}, identity={{"run": 1}})
ckpt.save(1, state)
ckpt.wait()

rename = async_path.rename

async def crash(src, dst):
  # "early": at the first rename of the save; "commit": at the rename that commits step 2,
  # after every file is written.
  if {when!r} == "early" or dst.name == "2":
    os._exit(17)
  return await rename(src, dst)

async_path.rename = crash
ckpt.save(2, {{"pools": state["pools"] + 1, "rng": state["rng"]}})
ckpt.wait()
print("unreachable")
"""


@pytest.mark.parametrize("when", ["early", "commit"])
def test_crash_during_save_leaves_no_complete_step(tmp_path, when):
  path = tmp_path / "ckpt"
  script = CRASH_SCRIPT.format(path=str(path), when=when)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 17, proc.stderr[-2000:]
  leftovers = [name for name in checkpoint_entries(path) if name != "1"]
  assert len(leftovers) == 1 and leftovers[0].startswith("2.orbax-checkpoint-tmp"), leftovers
  # At the commit every file is there; only the rename that makes it a step is missing.
  assert (path / leftovers[0] / "state" / "commit_success.txt").exists() == (when == "commit")

  like = {"pools": jnp.zeros((16, 4)), "rng": jax.random.key(0)}
  with TrainCheckpointer(path, identity={"run": 1}) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    restored = ckpt.restore(like)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["pools"], np.arange(64.0).reshape(16, 4))
    ckpt.save(2, like)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
  assert checkpoint_entries(path) == ["1", "2"]  # the stale temp folder is gone


def test_a_checkpoint_written_before_the_restructure_restores(tmp_path):
  """The identity of an adapter (config, routing version and digest, groups, base layout) kept its keys."""
  params, adapter = pre_restructure_adapter()
  opt = optax.adam(1e-3)
  like = {"adapter": adapter, "opt_state": opt.init(adapter), "step": jnp.asarray(0)}
  path = tmp_path / "ckpt"
  shutil.copytree(PRE_RESTRUCTURE / "checkpoint", path)
  with checkpointer(path, adapter, params, read_only=True) as ckpt:
    restored = ckpt.restore(like)
  assert restored.step == 5 and restored.data_state == {"position": 5}
  assert_trees_equal(restored.state, {**like, "step": jnp.asarray(5)})
  assert restored.state["adapter"].spec == adapter.spec
