"""experiments/lib/loop.py: a run stopped by SIGTERM resumes from its checkpoints exactly as if never stopped."""

import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mos_jax
from experiments.lib import loop
from experiments.lib.config import TrainConfig
from mos_jax import MoSConfig, adapt
from oracles.helpers import REPO_ROOT, assert_trees_equal, checkpoint_entries


# Reading damaged files makes TensorStore complete futures after Orbax closed their event loop;
# asyncio reports that as an unraisable "Event loop is closed" error. Nothing is lost.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


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
    with mos_jax.linen.inject(adapter, dropout_rng=rng):
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
  assert checkpoint_entries(run / "checkpoints") == ["3", "4"]
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


@pytest.mark.slow
def test_resume_demo_survives_an_external_sigterm(tmp_path):
  """A real preemption: another process sends SIGTERM; the resumed run matches bit for bit."""
  out = subprocess.run([sys.executable, "-m", "experiments.resume_demo", "--steps", "40",
                        "--kill-after", "15", "--every", "5", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "per-step losses identical to the unbroken run: True (40 steps)" in out.stdout
  assert "max |resumed - unbroken|: 0\n" in out.stdout
