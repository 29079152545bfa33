"""tpu/ scripts: shellcheck-clean, and their dry runs print the expected gcloud commands."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parents[1] / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))


def dry_run(name, **env):
  result = subprocess.run(["bash", str(TPU / name), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROJECT": "p", **env}, check=True)
  return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck")
def test_shellcheck_clean():
  result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=TPU.parent)
  assert result.returncode == 0, result.stdout


def test_create_uses_accelerator_and_spot():
  (line,) = dry_run("create.sh", ACCELERATOR_TYPE="v5litepod-16", ZONE="us-west4-a")
  assert "tpu-vm create mos-jax" in line and "--accelerator-type=v5litepod-16" in line and "--spot" in line
  (line,) = dry_run("create.sh", SPOT="0")
  assert "--spot" not in line


def test_launch_runs_the_tested_entry_point_on_all_workers():
  (line,) = dry_run("launch.sh", WORKDIR="gs://b/run", CONFIG="experiments/configs/tiny_sharded.py")
  assert "--worker=all" in line
  remote = next(w for w in shlex.split(line) if w.startswith("--command="))  # the dry run shell-quotes it
  # Run as a module from the checkout's root, as tests/test_multihost.py runs it.
  assert "cd ~/mos_jax && " in remote and "python -m experiments.train_sharded " in remote
  assert "gs://b/run" in remote and "experiments/configs/tiny_sharded.py" in remote
  assert (TPU.parent / "experiments" / "train_sharded.py").exists()


def test_stop_and_resume_find_the_launched_process():
  (launch,) = dry_run("launch.sh")
  process = next(w for w in shlex.split(launch) if w.startswith("--command=")).split("nohup ", 1)[1]
  (stop,) = dry_run("stop.sh")
  stop_pattern = re.search(r"pkill -TERM -f (\S+)", next(w for w in shlex.split(stop) if w.startswith("--command=")))
  resume_pattern = re.search(r"pgrep -f (\S+)\"", (TPU / "resume.sh").read_text())
  # pkill/pgrep -f match these (extended) regular expressions against the whole command line.
  assert re.search(stop_pattern.group(1), process) and re.search(resume_pattern.group(1), process)


def test_resume_dry_run_is_teardown_create_setup_launch():
  lines = dry_run("resume.sh")
  verbs = [next(w for w in ("delete", "create", "scp", "ssh", "tar") if w in l.split()) for l in lines]
  assert verbs == ["delete", "create", "tar", "scp", "ssh", "ssh"]


def test_missing_project_fails_clearly():
  env = {k: v for k, v in os.environ.items() if k != "PROJECT"} | {"PATH": "/usr/bin:/bin", "PROJECT": ""}
  result = subprocess.run(["bash", str(TPU / "create.sh")], capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 2 and "set PROJECT" in result.stderr
