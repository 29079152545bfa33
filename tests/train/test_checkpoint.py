"""Orbax training checkpoints: round trips, retention, resharding, identity, corruption, crashes, resume."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from transformers import FlaxLlamaForCausalLM, LlamaConfig

import mos_jax
from conftest import hf_numerics
from experiments.lib import classification, loop
from experiments.lib.config import TrainConfig
from helpers import random_pools
from mos_jax import MoSConfig, adapt
from mos_jax.core import adapter_identity
from mos_jax.train import CheckpointCorruptError, CheckpointMismatchError, TrainCheckpointer
from test_trainer import cfg as trainer_cfg, toy_data

# Reading damaged files makes TensorStore complete futures after Orbax closed their event loop;
# asyncio reports that as an unraisable "Event loop is closed" error. Nothing is lost.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]
QUARANTINE = "corrupt"  # TrainCheckpointer's folder for unreadable steps (its documented <directory>/corrupt/)
LOCK = ".writer.lock"  # its documented writer lock file
MOS = MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2)  # N = 1·4·2 = 8 shards: splits over 8 devices


def entries(folder):
  """The folder's entries but the writer's lock file, sorted."""
  return sorted(p.name for p in folder.iterdir() if p.name != LOCK)


def assert_trees_equal(a, b):
  """Same structure, dtypes and bits (typed PRNG keys compared through their key data)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
  assert entries(tmp_path) == ["6", "7"]


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
    with pytest.raises(CheckpointMismatchError) as err:
      ckpt.restore(state)
  assert "mos_config.seed: the checkpoint has 0, this run has 1" in str(err.value)
  assert "routing_sha256" in str(err.value)

  # Same seed, another budget: config and the pool shapes both differ.
  bigger = adapt(params, MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2))
  with checkpointer(tmp_path, bigger, params) as ckpt:
    with pytest.raises(CheckpointMismatchError) as err:
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
    with pytest.raises(CheckpointMismatchError) as err:
      ckpt.restore(train_state(other_model))
  message = str(err.value)
  assert "groups[model/layers/*/self_attn/q_proj].kernel_shape: the checkpoint has [32, 32], this run has [64, 64]" \
      in message
  assert "base_model[model/embed_tokens/embedding]: the checkpoint has [[64, 32], 'float32'], " \
         "this run has [[64, 64], 'float32']" in message
  # Refusals never move or delete the (good) checkpoint.
  assert entries(tmp_path) == ["1"]


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
    with pytest.raises(CheckpointCorruptError, match="Step 4"):
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
    with pytest.raises(CheckpointCorruptError, match="No checkpoint .* could be restored"):
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
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 17, proc.stderr[-2000:]
  leftovers = [name for name in entries(path) if name != "1"]
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
  assert entries(path) == ["1", "2"]  # the stale temp folder is gone


# --- resuming the experiments' training loop ---------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(8, name="proj")(x))


class Blocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = Block(name=f"{i}")(x) if i == 0 else x + Block(name=f"{i}")(x)
    return nn.Dense(1, name="head")(x)


class ToyModel(nn.Module):
  """Dense layers at ``layers/<i>/proj``, named like HF models' so MoS finds them."""

  @nn.compact
  def __call__(self, x):
    return Blocks(name="layers")(x)


TOY_MOS = MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2, target_modules=("proj",), dropout=0.2)


def toy_problem():
  model = ToyModel()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
  adapter = adapt(params, TOY_MOS)

  def loss_fn(adapter, params, batch, rng):
    with mos_jax.inject(adapter, dropout_rng=rng):
      pred = model.apply({"params": params}, batch["x"])
    return jnp.mean((pred[:, 0] - batch["y"]) ** 2)

  return params, adapter, loss_fn


class ToyBatches:
  """Random regression batches from a NumPy generator: state that a resume must restore."""

  def __init__(self, *, kill_at=None):
    self.rng, self.kill_at = np.random.default_rng(0), kill_at

  def __call__(self, step):
    if step == self.kill_at:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step `kill_at` runs
    x = self.rng.normal(size=(16, 8)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(1))}, 16


class StatefulToyBatches(ToyBatches):
  def get_state(self):
    return self.rng.bit_generator.state

  def set_state(self, state):
    self.rng.bit_generator.state = state


def run_fit(tmp_path, batches, **kw):
  params, adapter, loss_fn = toy_problem()
  cfg = TrainConfig(**{"mos": TOY_MOS, "lr": 3e-2, "steps": 7, "eval_every": 3, "progress": False,
                       "out_dir": str(tmp_path), **kw})
  # The trainable pytree is the adapter itself (its leaves are the pools); fit checkpoints its identity.
  return loop.fit(loss_fn, adapter, params, batches, cfg,
                  evaluate=lambda adapter: {"eval_norm": float(optax.tree.norm(adapter))})


@pytest.mark.parametrize("batches", [ToyBatches, StatefulToyBatches], ids=["replayed", "stateful"])
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, batches):
  full = run_fit(tmp_path / "full", batches())
  run = tmp_path / "run"
  with pytest.raises(loop.Interrupted) as stop:
    run_fit(run, batches(kill_at=4), checkpoint_every=3)
  assert stop.value.step == 4 and stop.value.code == 143
  assert entries(run / "checkpoints") == ["3", "4"]
  with open(run / "metrics.jsonl", "a") as log:  # a row after the checkpoint, lost with the "crash"
    log.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")

  resumed = run_fit(run, batches(), checkpoint_every=3, resume=True)
  assert [m["step"] for m in resumed["metrics"]] == list(range(1, 8))
  assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in full["metrics"]]
  assert [m.get("eval_norm") for m in resumed["metrics"]] == [m.get("eval_norm") for m in full["metrics"]]
  assert_trees_equal(resumed["trainable"], full["trainable"])
  logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == list(range(1, 8))
  # The losses differ between steps, so equal lists are not a coincidence of a constant loss.
  assert len({m["loss"] for m in full["metrics"]}) == 7


def test_existing_checkpoints_need_resume(tmp_path):
  run_fit(tmp_path, ToyBatches(), checkpoint_every=3)
  with pytest.raises(FileExistsError, match="resume=True"):
    run_fit(tmp_path, ToyBatches(), checkpoint_every=3)
  with pytest.raises(ValueError, match="checkpoint_every"):
    TrainConfig(mos=TOY_MOS, resume=True)


def test_train_resumes_from_a_mid_run_checkpoint_and_refuses_another_seed(tiny_bert, tmp_path):
  data, held_out = toy_data(24), toy_data(8, seed=1)
  kw = dict(steps=4, eval_every=4, checkpoint_every=2, out_dir=str(tmp_path / "a"))
  full = classification.train(tiny_bert, tiny_bert.params, data, held_out, trainer_cfg(tmp_path, **kw))
  # Keep only the step-2 checkpoint, as if the run had died during step 3.
  run = tmp_path / "b"
  shutil.copytree(tmp_path / "a", run)
  shutil.rmtree(run / "checkpoints" / "4")
  cfg = trainer_cfg(tmp_path, **{**kw, "out_dir": str(run), "resume": True})
  resumed = classification.train(tiny_bert, tiny_bert.params, data, held_out, cfg)
  assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in full["metrics"]]
  assert_trees_equal(resumed["trainable_state"], full["trainable_state"])

  other = trainer_cfg(tmp_path, **{**kw, "out_dir": str(run), "resume": True})
  other = dataclasses.replace(other, mos=dataclasses.replace(other.mos, seed=5))
  with pytest.raises(CheckpointMismatchError, match=r"train\.mos\.seed: the checkpoint has 0, this run has 5"):
    classification.train(tiny_bert, tiny_bert.params, data, held_out, other)


@pytest.mark.slow
def test_resume_demo_survives_an_external_sigterm(tmp_path):
  """A real preemption: another process sends SIGTERM; the resumed run matches bit for bit."""
  out = subprocess.run([sys.executable, "-m", "experiments.resume_demo", "--steps", "40",
                        "--kill-after", "15", "--every", "5", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "per-step losses identical to the unbroken run: True (40 steps)" in out.stdout
  assert "max |resumed - unbroken|: 0\n" in out.stdout
