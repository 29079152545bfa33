"""Atomic writes (mos_jax's file I/O) under faults: writers killed mid-replace, full disks, dead writers' leftovers.

What is promised (docs/guarantees.md): after a crash, the newest complete file or export is intact
and what was being written leaves nothing that reads as complete; a full disk is a clear error that
keeps every previous file. Exercised through the writers that use the atomic helpers (adapter files,
PEFT exports, checkpoints). The long kill loop is marked slow.
"""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mos_jax
from mos_jax.formats import export_peft, load_peft_factors, verify_export
from oracles.helpers import REPO_ROOT, folder_entries

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def adapter():
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}, "v_proj": {"kernel": jnp.ones((16, 8))}}
                       for i in range(3)}}
  a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2,
                                              target_modules=["q_proj", "v_proj"]))
  return a.replace(pools=jax.tree_util.tree_map(lambda x: x + 0.5, a.pools))


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
  return subprocess.run([sys.executable, "-c", REPLACE_CRASH, str(folder), str(offset), mode], env=ENV, cwd=REPO_ROOT,
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
  assert folder_entries(tmp_path) == ["peft"]  # leftovers of the dead writer removed
  assert export_in_subprocess(folder, 1.5, "ok").returncode == 0
  assert verify_export(folder) and folder_entries(tmp_path) == ["peft"]


def test_the_next_export_also_repairs_an_interrupted_replace(adapter, tmp_path):
  folder = tmp_path / "peft"
  assert export_in_subprocess(folder, 0.5, "ok").returncode == 0
  assert export_in_subprocess(folder, 1.5, "crash").returncode == 9
  export_peft(folder, adapter)
  assert verify_export(folder) and folder_entries(tmp_path) == ["peft"]


@pytest.mark.slow
def test_random_kills_during_export_rewrites_never_lose_the_export(tmp_path):
  folder = tmp_path / "peft"
  assert export_in_subprocess(folder, 0.5, "ok").returncode == 0
  rng = random.Random(0)
  for k in range(12):
    proc = subprocess.Popen([sys.executable, "-c", REPLACE_CRASH, str(folder), str(k), "ok"], env=ENV, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(2.0, 5.0))
    proc.kill()
    proc.wait()
    assert verify_export(folder)  # a complete export (old or new) is always there
  assert folder_entries(tmp_path) == ["peft"]


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
    out["adapter_loads"] = mos_jax.load_adapter(d / "a.safetensors").spec == a.spec
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
                         FULL_DISK], capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  for name in ("adapter", "peft"):
    assert out[name].startswith("OSError: [Errno 28] No space left on device while writing"), out[name]
    assert "is intact" in out[name]
  assert out["checkpoint"] != "no error"
  assert out["adapter_loads"] and out["peft_verifies"]
  assert out["entries"] == [".peft.lock", "a.safetensors", "ckpt", "filler", "peft"]  # no temp leftovers
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


# --- permissions, concurrent writers and readers (issue 20, unclear errors; issue 23.4) ---------------

@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_and_files_get_the_umask_permissions(adapter, tmp_path, umask, folder_mode, file_mode):
  """Export folders were 0700 (``mkdtemp``) and adapter files 0600 (``mkstemp``), whatever the umask."""
  import stat
  previous = os.umask(umask)
  try:
    folder = export_peft(tmp_path / "peft", adapter)
    path = mos_jax.save_adapter(tmp_path / "a.safetensors", adapter)
    again = export_peft(tmp_path / "peft", adapter)  # a replace, too
  finally:
    os.umask(previous)
  assert stat.S_IMODE(folder.stat().st_mode) == folder_mode and stat.S_IMODE(again.stat().st_mode) == folder_mode
  assert stat.S_IMODE(path.stat().st_mode) == file_mode
  assert stat.S_IMODE((folder / "adapter_config.json").stat().st_mode) == file_mode


HOLD_EXPORT = textwrap.dedent("""
    import os, sys, time, jax, jax.numpy as jnp, mos_jax
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}} for i in range(3)}}
    a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
    replace = os.replace
    def stall(src, dst):  # holds the export (and its lock) just before its renames
      print("renaming", flush=True)
      time.sleep(120)
    os.replace = stall
    mos_jax.export_peft(sys.argv[1], a)
""")


def test_a_second_export_writer_is_refused_by_name(adapter, tmp_path):
  """Two processes exporting one folder failed with a raw OSError from their colliding renames."""
  from mos_jax.formats import LockedError
  folder = export_peft(tmp_path / "peft", adapter)
  before, _ = load_peft_factors(folder)
  proc = subprocess.Popen([sys.executable, "-c", HOLD_EXPORT, str(folder)], stdout=subprocess.PIPE, env=ENV,
                          cwd=REPO_ROOT)
  try:
    assert proc.stdout.readline().strip() == b"renaming"
    with pytest.raises(LockedError, match=rf"Export folder {folder} is already being written by another process "
                                          rf"\(host .*, pid {proc.pid}, since .*\)\. Two writers"):
      export_peft(folder, adapter)
    after, _ = load_peft_factors(folder)  # readers are never locked out
    assert after.keys() == before.keys()
  finally:
    proc.kill()
    proc.wait()
  export_peft(folder, adapter)  # the dead writer's lock went with it; its temp folder is removed
  assert verify_export(folder) and folder_entries(tmp_path) == ["peft"]


EXPORT_LOOP = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, mos_jax
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}} for i in range(3)}}
    a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
    versions = [a.replace(pools=jax.tree_util.tree_map(lambda x: x + k, a.pools)) for k in (0.5, 1.5)]
    print("ready", flush=True)
    for k in range(int(sys.argv[2])):
      mos_jax.export_peft(sys.argv[1], versions[k % 2])
""")


def test_a_reader_during_live_exports_sees_one_whole_export_every_time(tmp_path):
  """A reader of a folder being re-exported got CorruptError (files of two exports mixed) on intact exports."""
  folder = tmp_path / "peft"
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((16, 16))}} for i in range(3)}}
  a = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=["q_proj"]))
  expected = [load_peft_factors(export_peft(tmp_path / f"v{k}", a.replace(pools=jax.tree_util.tree_map(
      lambda x: x + k, a.pools))))[0] for k in (0.0, 0.5, 1.5)]
  export_peft(folder, a)
  proc = subprocess.Popen([sys.executable, "-c", EXPORT_LOOP, str(folder), "300"], stdout=subprocess.PIPE, env=ENV,
                          cwd=REPO_ROOT)
  reads = 0
  try:
    assert proc.stdout.readline().strip() == b"ready"
    while proc.poll() is None:
      assert verify_export(folder)
      factors, _ = load_peft_factors(folder)
      assert any(all(np.array_equal(factors[p][0], e[p][0]) and np.array_equal(factors[p][1], e[p][1])
                       for p in e) for e in expected), "a read mixed two exports"
      reads += 1
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 0 and reads >= 20, (proc.returncode, reads)
