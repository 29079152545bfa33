"""Fault injection: kills, corruption, truncation, full disks and two writers, for every file we write.

What is promised (README, "Guarantees"): after a crash, the newest complete step / file / export
is intact and what was being written leaves nothing that reads as complete; after corruption, the
damage is reported as damage (``CorruptError``) and checkpoints fall back to the newest intact
step; a genuinely different run or model is a ``MismatchError``. The fast cases run by default, the
long kill loops are marked slow.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mos_jax
from mos_jax.core import CorruptError
from mos_jax.formats import export_peft, load_peft_factors, verify_export
from mos_jax.train import CheckpointCorruptError, CheckpointLockedError, CheckpointMismatchError, TrainCheckpointer

ROOT = Path(__file__).resolve().parents[1]
QUARANTINE = "corrupt"
IDENTITY = {"run": 1, "adapter": {"seed": 0}}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


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
    restored = restore(path)  # never CheckpointMismatchError, never KeyError
    assert_state(restored, restored.step)
    outcomes[restored.step] += 1
  assert outcomes[1] >= 55, outcomes  # nearly every flip is damage; harmless ones (e.g. in spacing) may load


def test_a_different_run_is_still_a_mismatch(pristine, tmp_path):
  path = copy_of(pristine, tmp_path)
  with TrainCheckpointer(path, identity={**IDENTITY, "run": 2}) as ckpt:
    with pytest.raises(CheckpointMismatchError, match="does not belong to this run"):
      ckpt.restore(LIKE)
    assert ckpt.all_steps() == [1, 2]  # nothing set aside


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
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, env=ENV, cwd=ROOT)
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


HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from mos_jax.train import TrainCheckpointer
    ckpt = TrainCheckpointer(sys.argv[1], identity={"run": 1})
    print("holding", flush=True)
    time.sleep(120)
""")


def test_another_process_holding_the_folder_is_named_and_its_death_frees_it(tmp_path):
  path = tmp_path / "ckpt"
  proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(path)], stdout=subprocess.PIPE, env=ENV, cwd=ROOT)
  try:
    assert proc.stdout.readline().strip() == b"holding"
    with pytest.raises(CheckpointLockedError, match=rf"pid {proc.pid}"):
      TrainCheckpointer(path, identity={"run": 1})
  finally:
    proc.kill()
    proc.wait()
  with TrainCheckpointer(path, identity={"run": 1}) as ckpt:  # a dead holder leaves no stale lock
    ckpt.save(1, state_at(1), force=True)


# --- adapter files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter():
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}, "v_proj": {"kernel": jnp.ones((16, 8))}}
                       for i in range(3)}}
  a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2))
  return a.replace(pools=jax.tree_util.tree_map(lambda x: x + 0.5, a.pools))


def test_truncated_adapter_files_are_reported_as_damage(adapter, tmp_path):
  data = mos_jax.save_adapter(tmp_path / "a.safetensors", adapter).read_bytes()
  for cut in np.linspace(0, len(data) - 1, 12).astype(int):
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    with pytest.raises(CorruptError):
      mos_jax.load_adapter(tmp_path / "cut.safetensors")


# --- PEFT and merged exports -----------------------------------------------------------------

REPLACE_CRASH = textwrap.dedent("""
    import os, sys, jax, jax.numpy as jnp, mos_jax
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}} for i in range(3)}}
    a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
    a = a.replace(pools=jax.tree_util.tree_map(lambda x: x + float(sys.argv[2]), a.pools))
    replace, calls = os.replace, []
    def crash(src, dst):  # killed between moving the previous export aside and moving the new one in
      calls.append(dst)
      if len(calls) == 2:
        os._exit(9)
      replace(src, dst)
    if sys.argv[3] == "crash":
      os.replace = crash
    mos_jax.export_peft(sys.argv[1], a)
""")


def export_in_subprocess(folder, offset, mode):
  return subprocess.run([sys.executable, "-c", REPLACE_CRASH, str(folder), str(offset), mode], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_export_replace_killed_between_its_renames_keeps_the_previous_export(tmp_path):
  """Issue 13.6: a crash between the two renames left no folder at all."""
  folder = tmp_path / "peft"
  assert export_in_subprocess(folder, 0.5, "ok").returncode == 0
  before, _ = load_peft_factors(folder)
  proc = export_in_subprocess(folder, 1.5, "crash")
  assert proc.returncode == 9, proc.stderr[-2000:]
  assert not folder.exists() and any(p.name.startswith(".peft.old-") for p in tmp_path.iterdir())
  after, _ = load_peft_factors(folder)  # the load restores the previous export first
  assert set(after) == set(before)
  for name in before:
    np.testing.assert_array_equal(after[name][0], before[name][0])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # leftovers of the dead writer removed
  assert export_in_subprocess(folder, 1.5, "ok").returncode == 0
  assert verify_export(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_the_next_export_also_repairs_an_interrupted_replace(adapter, tmp_path):
  folder = tmp_path / "peft"
  assert export_in_subprocess(folder, 0.5, "ok").returncode == 0
  assert export_in_subprocess(folder, 1.5, "crash").returncode == 9
  export_peft(folder, adapter)
  assert verify_export(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


@pytest.mark.slow
def test_random_kills_during_export_rewrites_never_lose_the_export(tmp_path):
  folder = tmp_path / "peft"
  assert export_in_subprocess(folder, 0.5, "ok").returncode == 0
  rng = random.Random(0)
  for k in range(12):
    proc = subprocess.Popen([sys.executable, "-c", REPLACE_CRASH, str(folder), str(k), "ok"], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(2.0, 5.0))
    proc.kill()
    proc.wait()
    assert verify_export(folder)  # a complete export (old or new) is always there
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


# --- a full disk -------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import jax, jax.numpy as jnp, mos_jax
    from mos_jax.train import TrainCheckpointer
    d = Path(sys.argv[1])
    free = lambda: os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((256, 256))}} for i in range(4)}}
    a = mos_jax.adapt(params, mos_jax.MoSConfig.lora(8, target_modules=["q_proj"]))
    out = {}
    mos_jax.save_adapter(d / "a.safetensors", a)
    mos_jax.export_peft(d / "peft", a)
    ckpt = TrainCheckpointer(d / "ckpt", identity={"run": 1}, async_save=False)
    ckpt.save(1, {"pools": a.pools}, force=True)
    (d / "filler").write_bytes(b"x" * (free() - 16384))
    for name, write in (("adapter", lambda: mos_jax.save_adapter(d / "a.safetensors", a)),
                        ("peft", lambda: mos_jax.export_peft(d / "peft", a)),
                        ("checkpoint", lambda: ckpt.save(2, {"pools": a.pools}, force=True))):
      try:
        write()
        out[name] = "no error"
      except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
    out["adapter_loads"] = mos_jax.load_adapter(d / "a.safetensors").routing == a.routing
    out["peft_verifies"] = mos_jax.formats.verify_export(d / "peft")
    out["entries"] = sorted(p.name for p in d.iterdir())
    (d / "filler").unlink()
    ckpt.save(3, {"pools": a.pools}, force=True)  # saving resumes once there is space
    out["steps"] = ckpt.all_steps()
    out["restored"] = ckpt.restore({"pools": a.pools}).step
    ckpt.close()
    print("RESULT " + json.dumps(out))
""")


def test_a_full_disk_gives_a_clear_error_and_keeps_every_previous_file(tmp_path):
  """A 2 MB tmpfs in a user+mount namespace; skipped where those are not allowed."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size=2m tmpfs {mnt}"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.decode()[-200:]}")
  proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                         f'mount -t tmpfs -o size=2m tmpfs {mnt} && exec "$0" -c "$1" {mnt}', sys.executable,
                         FULL_DISK], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  for name in ("adapter", "peft"):
    assert out[name].startswith("OSError: [Errno 28] No space left on device while writing"), out[name]
    assert "is intact" in out[name]
  assert out["checkpoint"] != "no error"
  assert out["adapter_loads"] and out["peft_verifies"]
  assert out["entries"] == ["a.safetensors", "ckpt", "filler", "peft"]  # no temp leftovers
  assert out["restored"] == 3 and 1 in out["steps"] and 2 not in out["steps"]


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(adapter, tmp_path):
  import socket
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # a pid that no longer runs
  host = socket.gethostname()
  stale = tmp_path / f".a.safetensors.tmp-{host}-{dead.pid}-abc123"
  live = tmp_path / f".a.safetensors.tmp-{host}-{os.getppid()}-def456"  # a running process's
  other_host = tmp_path / f".a.safetensors.tmp-elsewhere-{dead.pid}-ghi789"  # cannot be judged from here
  for p in (stale, live, other_host):
    p.write_bytes(b"partial")
  mos_jax.save_adapter(tmp_path / "a.safetensors", adapter)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.safetensors", live.name, other_host.name])


def test_a_reader_falls_back_without_moving_anything(pristine, tmp_path):
  path = copy_of(pristine, tmp_path)
  edit_meta(path, 2, lambda b: b.replace(b'"run": 1', b'"run": 3'))
  with TrainCheckpointer(path, identity=IDENTITY, read_only=True) as reader:
    assert_state(reader.restore(LIKE), 1)
  assert not (path / QUARANTINE).exists() and (path / "2").exists()
