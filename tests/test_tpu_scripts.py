"""tpu/ scripts: shellcheck-clean, and their dry runs print the expected gcloud commands."""

import os
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
  assert "experiments/train_sharded.py" in line and "gs://b/run" in line
  assert (TPU.parent / "experiments" / "train_sharded.py").exists()


def test_resume_dry_run_is_teardown_create_setup_launch():
  lines = dry_run("resume.sh")
  verbs = [next(w for w in ("delete", "create", "scp", "ssh", "tar") if w in l.split()) for l in lines]
  assert verbs == ["delete", "create", "tar", "scp", "ssh", "ssh"]


def test_missing_project_fails_clearly():
  env = {k: v for k, v in os.environ.items() if k != "PROJECT"} | {"PATH": "/usr/bin:/bin", "PROJECT": ""}
  result = subprocess.run(["bash", str(TPU / "create.sh")], capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 2 and "set PROJECT" in result.stderr
