"""Fault injection into training checkpoints: kills, corruption, truncation and two writers.

What is promised (docs/guarantees.md): after a crash, the newest complete step is intact and what
was being written leaves nothing that reads as complete; after corruption, the damage is reported
as damage (``CorruptError``) and restores fall back to the newest intact step; a genuinely
different run is a ``MismatchError``. The fast cases run by default, the long kill loops are
marked slow. Atomic file writes (adapter files, exports) under kills and full disks:
tests/io/test_atomic_writes.py.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import MismatchError
from mos_jax.train import CheckpointLockedError, TrainCheckpointer
from oracles.helpers import REPO_ROOT

QUARANTINE = "corrupt"
IDENTITY = {"run": 1, "adapter": {"seed": 0}}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}


def state_at(step):
  return {"pools": jnp.arange(64.0).reshape(16, 4) * step, "rng": jax.random.key(step)}


LIKE = state_at(0)


def assert_state(restored, step):
  assert restored.step == step and restored.data_state == {"position": step}
  np.testing.assert_array_equal(restored.state["pools"], state_at(step)["pools"])
  np.testing.assert_array_equal(jax.random.key_data(restored.state["rng"]), jax.random.key_data(state_at(step)["rng"]))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A checkpoint folder with steps 1 and 2, copied afresh by each test that damages it."""
  path = tmp_path_factory.mktemp("pristine") / "ckpt"
  with TrainCheckpointer(path, identity=IDENTITY, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state_at(step), data_state={"position": step}, force=True)
      ckpt.wait()
  return path


def copy_of(pristine, tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(pristine, path)
  return path


def restore(path):
  with TrainCheckpointer(path, identity=IDENTITY) as ckpt:
    return ckpt.restore(LIKE)


# --- checkpoint metadata ------------------------------------------------------------------

def edit_meta(path, step, edit):
  meta = path / str(step) / "meta" / "metadata"
  meta.write_bytes(edit(meta.read_bytes()))


@pytest.mark.parametrize("edit", [
    lambda b: b.replace(b'"run": 1', b'"run": 3'),  # the old failure: "does not belong to this run"
    lambda b: b.replace(b'"layout"', b'"layouT"'),  # the old failure: a bare KeyError
    lambda b: b.replace(b'"data_state": {"position": 2}', b'"data_state": {"position": 7}'),  # silently returned
    lambda b: b.replace(b'"step": 2', b'"step": 1'),
    lambda b: b[:len(b) // 2],  # truncated: not JSON
    lambda b: b"[]",
], ids=["identity", "key-name", "data-state", "step", "truncated", "not-an-object"])
def test_damaged_metadata_falls_back_to_the_previous_step(pristine, tmp_path, edit):
  """Issue 13.2: metadata damage is damage (older step restored, bad one set aside), not another run."""
  path = copy_of(pristine, tmp_path)
  edit_meta(path, 2, edit)
  assert_state(restore(path), 1)
  assert [p.name.split("-")[0] for p in (path / QUARANTINE).iterdir()] == ["2"]


def test_single_bit_flips_in_metadata_are_never_a_mismatch_or_a_silent_change(pristine, tmp_path):
  """60 random single-bit flips: each restores step 2 unchanged (a flip JSON cannot see) or step 1."""
  meta = (pristine / "2" / "meta" / "metadata").read_bytes()
  rng = random.Random(0)
  outcomes = {1: 0, 2: 0}
  for trial in range(60):
    path = copy_of(pristine, tmp_path / str(trial))
    pos, bit = rng.randrange(len(meta)), rng.randrange(8)
    edit_meta(path, 2, lambda b: b[:pos] + bytes([b[pos] ^ (1 << bit)]) + b[pos + 1:])
    restored = restore(path)  # never MismatchError, never KeyError
    assert_state(restored, restored.step)
    outcomes[restored.step] += 1
  assert outcomes[1] >= 55, outcomes  # nearly every flip is damage; harmless ones (e.g. in spacing) may load


def test_a_different_run_is_still_a_mismatch(pristine, tmp_path):
  path = copy_of(pristine, tmp_path)
  with TrainCheckpointer(path, identity={**IDENTITY, "run": 2}) as ckpt:
    with pytest.raises(MismatchError, match="does not belong to this run"):
      ckpt.restore(LIKE)
    assert ckpt.all_steps() == [1, 2]  # nothing set aside


def rewrite_meta(path, step, change):
  """Edits step ``step``'s metadata as a writer would: ``change(meta)``, then its checksum recomputed."""
  meta_file = path / str(step) / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  change(meta)
  body = {k: v for k, v in meta.items() if k != "meta_sha256"}
  meta["meta_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  meta_file.write_text(json.dumps(meta))


def test_a_step_of_a_newer_format_is_refused_and_never_set_aside(pristine, tmp_path):
  """Issue 20.14: a step written by a newer mos_jax was taken for damage and moved to corrupt/."""
  path = copy_of(pristine, tmp_path)
  rewrite_meta(path, 2, lambda meta: meta.update(format="mos_jax.train_checkpoint/9", new_field={"x": 1}))
  with TrainCheckpointer(path, identity=IDENTITY) as ckpt:
    with pytest.raises(MismatchError, match=r"Checkpoint step 2 was written by a newer mos_jax \(format "
                                            r"'mos_jax.train_checkpoint/9'.*Upgrade mos_jax"):
      ckpt.restore(LIKE)
    assert ckpt.all_steps() == [1, 2]
  assert not (path / QUARANTINE).exists() and (path / "2" / "meta" / "metadata").exists()
  # A newer format whose checksum fails is damage (e.g. a flipped bit turning "/3" into "/4"): set aside as before.
  path = copy_of(pristine, tmp_path / "flip")
  edit_meta(path, 2, lambda b: b.replace(b"train_checkpoint/3", b"train_checkpoint/4"))
  assert_state(restore(path), 1)
  assert [p.name.split("-")[0] for p in (path / QUARANTINE).iterdir()] == ["2"]


def test_numpy_integer_steps_are_saved_as_plain_integers(tmp_path):
  """Issue 20 (unclear errors): a NumPy int64 step failed deep in Orbax with "not JSON serializable"."""
  path = tmp_path / "ckpt"
  with TrainCheckpointer(path, identity=IDENTITY, keep=None) as ckpt:
    for step in (np.int64(1), np.int32(2), jnp.asarray(3)):
      assert ckpt.save(step, state_at(int(step)), data_state={"position": int(step)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
    assert_state(ckpt.restore(LIKE, step=np.int64(2)), 2)
    for bad in (1.5, "4", True):
      with pytest.raises(TypeError, match="A checkpoint step must be an integer"):
        ckpt.save(bad, state_at(4), force=True)
  assert json.loads((path / "3" / "meta" / "metadata").read_text())["step"] == 3


# --- checkpoint arrays -----------------------------------------------------------------------

def test_every_truncated_or_flipped_checkpoint_file_restores_an_intact_step(pristine, tmp_path):
  """Each file of step 2, truncated or with a flipped byte: step 2 unchanged or step 1, never garbage."""
  files = sorted(p.relative_to(pristine) for p in (pristine / "2").rglob("*") if p.is_file())
  assert len(files) >= 8
  for k, rel in enumerate(files):
    for how in ("truncate", "flip"):
      path = copy_of(pristine, tmp_path / f"{k}-{how}")
      data = (path / rel).read_bytes()
      if not data:
        continue
      if how == "truncate":
        (path / rel).write_bytes(data[:len(data) // 2])
      else:
        (path / rel).write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1:])
      try:
        restored = restore(path)
      except FileNotFoundError:
        continue  # a commit marker damaged so the step is no longer listed: nothing restorable is wrong
      assert_state(restored, restored.step)


# --- kills during async saves -----------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from mos_jax.train import TrainCheckpointer
    def state_at(step):
      return {"pools": jnp.arange(64.0).reshape(16, 4) * step, "rng": jax.random.key(step)}
    ckpt = TrainCheckpointer(sys.argv[1], identity={"run": 1, "adapter": {"seed": 0}}, keep=None)
    print("ready", flush=True)
    step = (ckpt.latest_step() or 0) + 1
    while True:
      ckpt.save(step, state_at(step), data_state={"position": step}, force=True)
      step += 1
""")


def kill_during_saves(path, delays):
  for delay in delays:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, env=ENV, cwd=REPO_ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restored = restore(path)  # the newest complete step, bit-exactly, whatever the kill interrupted
    assert_state(restored, restored.step)


def test_kill_during_async_save_keeps_the_newest_complete_step(tmp_path):
  kill_during_saves(tmp_path / "ckpt", [1.5])


@pytest.mark.slow
def test_kills_at_random_points_of_async_saves(tmp_path):
  kill_during_saves(tmp_path / "ckpt", [random.Random(k).uniform(0.2, 2.0) for k in range(6)])


# --- two writers -------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_reader_is_not(tmp_path):
  """Issue 13.5: two writers on one folder made each other's steps vanish, silently."""
  path = tmp_path / "ckpt"
  with TrainCheckpointer(path, identity=IDENTITY) as first:
    first.save(1, state_at(1), data_state={"position": 1})
    first.wait()
    with pytest.raises(CheckpointLockedError, match=rf"already being written .*pid {os.getpid()}.*read_only=True"):
      TrainCheckpointer(path, identity=IDENTITY)
    with TrainCheckpointer(path, identity=IDENTITY, read_only=True) as reader:
      assert_state(reader.restore(LIKE), 1)
      with pytest.raises(RuntimeError, match="read_only"):
        reader.save(2, state_at(2))
    first.save(2, state_at(2), data_state={"position": 2})
  assert_state(restore(path), 2)  # the lock was released on close


def test_a_deleted_lock_file_is_caught_at_the_next_save(tmp_path):
  """Issue 20.15: deleting .writer.lock while it was held let a second writer in beside the first."""
  path = tmp_path / "ckpt"
  with TrainCheckpointer(path, identity=IDENTITY) as first:
    first.save(1, state_at(1), data_state={"position": 1}, force=True)
    first.wait()
    (path / ".writer.lock").unlink()
    second = TrainCheckpointer(path, identity=IDENTITY)  # a fresh lock file: nothing tells it the first exists
    with pytest.raises(CheckpointLockedError, match=r"lock file .*\.writer\.lock was deleted or replaced while this "
                                                    r"process held it.*only one process"):
      first.save(2, state_at(2), data_state={"position": 2}, force=True)
    second.save(2, state_at(2), data_state={"position": 2}, force=True)
    second.close()
  assert_state(restore(path), 2)  # only the second writer's step 2 was written


HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from mos_jax.train import TrainCheckpointer
    ckpt = TrainCheckpointer(sys.argv[1], identity={"run": 1})
    print("holding", flush=True)
    time.sleep(120)
""")


def test_another_process_holding_the_folder_is_named_and_its_death_frees_it(tmp_path):
  path = tmp_path / "ckpt"
  proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(path)], stdout=subprocess.PIPE, env=ENV, cwd=REPO_ROOT)
  try:
    assert proc.stdout.readline().strip() == b"holding"
    with pytest.raises(CheckpointLockedError, match=rf"pid {proc.pid}"):
      TrainCheckpointer(path, identity={"run": 1})
  finally:
    proc.kill()
    proc.wait()
  with TrainCheckpointer(path, identity={"run": 1}) as ckpt:  # a dead holder leaves no stale lock
    ckpt.save(1, state_at(1), force=True)


def test_a_reader_falls_back_without_moving_anything(pristine, tmp_path):
  path = copy_of(pristine, tmp_path)
  edit_meta(path, 2, lambda b: b.replace(b'"run": 1', b'"run": 3'))
  with TrainCheckpointer(path, identity=IDENTITY, read_only=True) as reader:
    assert_state(reader.restore(LIKE), 1)
  assert not (path / QUARANTINE).exists() and (path / "2").exists()
