"""tpu/ scripts: shellcheck-clean, dry runs, and real runs against a fake `gcloud`.

The fake `gcloud` (first on PATH) records every call, answers `describe` from scripted state
sequences (READY -> PREEMPTED -> NOT_FOUND ...), fails `create` on scripted "no capacity"
errors, and runs each `ssh --command` locally under `bash -c` in a per-worker home folder, relaying
its output until the command's stdout closes, as ssh does. So self-matching `pkill`/`pgrep`, a
launch that keeps ssh open, and the babysitter's create/delete decisions all show up here. The
workers' "python" is a stub trainer (prints steps, exits 143 on SIGTERM) that a fake `python3.11`
puts in the venv `tpu/worker.sh setup` builds.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import pytest

from oracles.helpers import REPO_ROOT

TPU = REPO_ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))

FAKE_GCLOUD = r'''#!PYTHON
"""A fake gcloud for tests/tpu/test_scripts.py (see there)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_GCLOUD_ROOT"])
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\n")
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
positional = [a for a in args if not a.startswith("--")]
workers = [root / f"worker{i}" for i in range(int(os.environ.get("FAKE_WORKERS", "2")))]


def next_line(name, default):
  """The first line of a script file, consumed unless it is the last (which then repeats)."""
  path = root / name
  lines = path.read_text().split() if path.exists() else []
  if not lines:
    return default
  if len(lines) > 1:
    path.write_text("\n".join(lines[1:]) + "\n")
  return lines[0]


def fresh_workers():
  """A new slice: the old VMs' processes die with them, and the homes start empty."""
  for w in workers:
    pid_file = w / "mos_run" / "train.pid"
    if pid_file.exists():
      try:
        os.killpg(int(pid_file.read_text()), 9)  # the launch wrapper leads its own session
      except ProcessLookupError:
        pass
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)


if positional[:3] == ["config", "get-value", "project"]:
  print("fake-project")
  sys.exit(0)
def local(url):
  """The fake bucket folder root/gcs: gs://B/P -> root/gcs/B/P."""
  return root / "gcs" / url.removeprefix("gs://") if url.startswith("gs://") else Path(url)


if positional[:2] == ["storage", "cp"]:
  *sources, dest = [a for a in positional[2:] if a != "-r"]
  if dest.startswith("gs://") and os.environ.get("FAKE_BUCKET_DENY") == "1":
    sys.exit("ERROR: (gcloud.storage.cp) HTTPError 403: does not have storage.objects.create access")
  for src in sources:
    for f in (root / "gcs").glob(src.removeprefix("gs://")) if src.startswith("gs://") else [Path(src)]:
      target = local(dest) / f.name if dest.endswith("/") else local(dest)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(f, target)
  sys.exit(0)
if positional[:2] == ["storage", "ls"]:
  folder = local(positional[2])
  if not folder.exists():
    sys.exit(f"ERROR: (gcloud.storage.ls) One or more URLs matched no objects: {positional[2]}")
  for f in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
    print(positional[2].rstrip("/") + "/" + f.name if folder.is_dir() else positional[2])
  sys.exit(0)
if positional[:2] == ["storage", "rm"]:
  local(positional[2]).unlink()
  sys.exit(0)
group, verb = positional[2], positional[3]
if verb == "describe":
  state = next_line(f"{group}.states", "NOT_FOUND")
  if state == "NOT_FOUND":
    sys.exit(f"ERROR: (gcloud.compute.tpus.{group}.describe) NOT_FOUND: Resource 'projects/p/locations/z/"
             f"{positional[4]}' was not found")
  if state == "ERROR":
    sys.exit(f"ERROR: (gcloud.compute.tpus.{group}.describe) UNAVAILABLE: The service is currently unavailable.")
  print(state)
elif verb == "create":
  if next_line("create.results", "ok") == "capacity":
    sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone "z"; you can '
             "try in another zone where Cloud TPU Nodes are offered")
  fresh_workers()  # a new slice: empty homes
elif verb == "delete":
  # Deleted (gcloud waits for it): describe says NOT_FOUND until the next create.
  for kind in {group, "tpu-vm"}:
    path = root / f"{kind}.states"
    path.write_text("NOT_FOUND\n" + (path.read_text() if path.exists() else ""))
elif verb == "scp":
  src, dest = positional[4], positional[5].split(":", 1)[1]
  for w in workers:
    shutil.copy(src, w / dest)
elif verb == "ssh":
  chosen = workers if opts.get("worker", "0") == "all" else [workers[int(opts.get("worker", "0"))]]
  codes = []
  for w in chosen:
    w.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(w), PATH=f"{root / 'bin'}:{os.environ['PATH']}", MOS_WORKER_ID=w.name[6:])
    # Like ssh: wait until the remote command's stdout is closed, not just until it exits.
    out = subprocess.run(["bash", "-c", opts["command"]], cwd=w, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sys.stdout.buffer.write(out.stdout)
    codes.append(out.returncode)
  sys.exit(max(codes))
else:
  sys.exit(f"fake gcloud: unexpected {args}")
'''

# Put in the venv by the fake python3.11: a trainer that prints steps, exits 143 on SIGTERM.
FAKE_TRAINER = r'''#!/usr/bin/env bash
echo "fake trainer: $*"
step=0
trap 'echo "preempted, saved step $step"; exit 143' TERM
if [[ -n "${FAKE_HANG_ONCE:-}" && ! -f "$HOME/hung-once" ]]; then
  touch "$HOME/hung-once"
  echo "step 1"
  trap '' TERM  # a process stuck in a collective never reaches the preemption sync point
  while true; do sleep 1; done
fi
while ((step < ${FAKE_TRAIN_STEPS:-3})); do
  step=$((step + 1)); echo "step $step"; sleep "${FAKE_STEP_SECONDS:-0.05}"
done
echo "training finished at step $step"
exit "${FAKE_TRAIN_EXIT:-0}"
'''

FAKE_PYTHON311 = r'''#!/usr/bin/env bash
# `python3.11 -m venv DIR`: a "venv" whose python is the stub trainer, whose pip records its arguments and
# whose `hf download REPO --local-dir DEST ...` records the token it would use and its arguments.
[[ "$1 $2" == "-m venv" ]] || { echo "fake python3.11: unexpected $*" >&2; exit 2; }
mkdir -p "$3/bin"
cp "FAKE_TRAINER" "$3/bin/python"
printf '#!/bin/sh\necho "$*" >> "$(dirname "$0")/../pip-calls"\n' > "$3/bin/pip"
printf '#!/bin/sh\ncp "$HOME/.cache/huggingface/token" "$4/token-used" && echo "$2" > "$4/config.json" \
  && echo "$*" > "$4/hf-args"\n' > "$3/bin/hf"
chmod +x "$3/bin/python" "$3/bin/pip" "$3/bin/hf"
'''


@pytest.fixture
def fake(tmp_path):
  """A fake gcloud on PATH and two empty worker homes; returns helpers to script and inspect it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable, 1))
  (tmp_path / "trainer").write_text(FAKE_TRAINER)
  (bin_dir / "python3.11").write_text(FAKE_PYTHON311.replace("FAKE_TRAINER", str(tmp_path / "trainer")))
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  for i in range(2):
    (tmp_path / f"worker{i}").mkdir()
  yield Fake(tmp_path)
  for pid_file in tmp_path.glob("worker*/mos_run/train.pid"):  # no stub trainer outlives its test
    try:
      os.killpg(int(pid_file.read_text()), 9)  # the launch wrapper leads its own session
    except (ProcessLookupError, ValueError):
      pass


class Fake:
  def __init__(self, root):
    self.root = root
    self.env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "FAKE_GCLOUD_ROOT": str(root),
                "PROJECT": "p", "ZONE": "us-west4-a", "CHECK_SSH_AGENT": "0", "TMPDIR": str(root),
                "POLL_SECONDS": "0.1", "WAIT_POLL_SECONDS": "0.1", "CREATE_RETRY_SECONDS": "0.1",
                "WORKDIR": "gs://b/run", "LOG_UPLOAD_SECONDS": "3600"}
    (root / "gcs" / "b").mkdir(parents=True, exist_ok=True)

  def script(self, name, *lines):
    (self.root / name).write_text("\n".join(lines) + "\n")

  def run(self, script, timeout=60, **env):
    started = time.monotonic()
    result = subprocess.run(["bash", str(TPU / script)], capture_output=True, text=True, timeout=timeout,
                            env={**self.env, **env})
    result.seconds = time.monotonic() - started
    return result

  def clear(self):
    (self.root / "calls.jsonl").unlink(missing_ok=True)

  def calls(self):
    path = self.root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def verbs(self):
    """The gcloud calls as "group verb" ("tpu-vm ssh", "queued-resources create", ...)."""
    return [f"{c[2]} {c[3]}" for c in self.calls() if c[:2] == ["compute", "tpus"]]

  def home(self, i=0):
    return self.root / f"worker{i}"

  def worker_status(self, i=0):
    out = subprocess.run(["bash", str(self.home(i) / "mos_jax" / "tpu" / "worker.sh"), "status"],
                         capture_output=True, text=True, env={**self.env, "HOME": str(self.home(i))}, timeout=30)
    return out.stdout.strip()

  def wait_status(self, prefix, i=0, timeout=30):
    deadline = time.monotonic() + timeout
    while not (status := self.worker_status(i)).startswith(prefix):
      assert time.monotonic() < deadline, status
      time.sleep(0.1)
    return status


def dry_run(name, **env):
  result = subprocess.run(["bash", str(TPU / name), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROJECT": "p", **env}, check=True)
  return result.stdout.splitlines()


def remote_command(line):
  return next(w for w in shlex.split(line) if w.startswith("--command="))[len("--command="):]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck")
def test_shellcheck_clean():
  result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=TPU.parent)
  assert result.returncode == 0, result.stdout


def test_create_queues_spot_capacity_by_default():
  (line,) = dry_run("create.sh", ACCELERATOR_TYPE="v5litepod-16", ZONE="us-west4-a",
                    RUNTIME_VERSION="v2-alpha-tpuv5-lite")
  assert "queued-resources create mos-jax --node-id=mos-jax" in line and "--spot" in line
  assert "--accelerator-type=v5litepod-16" in line and "--runtime-version=v2-alpha-tpuv5-lite" in line
  (line,) = dry_run("create.sh", SPOT="0", QUEUED="0", ACCELERATOR_TYPE="v4-32")
  assert "tpu-vm create mos-jax" in line and "--spot" not in line and "--version=tpu-ubuntu2204-base" in line
  (line,) = dry_run("create.sh", QUEUE_VALID_FOR="12h")
  assert "--valid-until-duration=12h" in line and "--runtime-version=v2-alpha-tpuv5-lite" in line


def test_launch_runs_the_entry_point_through_the_worker_helper():
  (line,) = dry_run("launch.sh", WORKDIR="gs://b/run", CONFIG="experiments/configs/gemma3_12b_v4_32.py",
                    MODEL_SRC="gs://b/models/gemma-3-12b-it", DATA="gs://b/data/train.jsonl", TRAIN_ARGS="--steps 20")
  assert "--worker=all" in line
  assert remote_command(line) == (
      "LOG_UPLOAD_SECONDS=300 bash ~/mos_jax/tpu/worker.sh launch gs://b/run --config "
      "experiments/configs/gemma3_12b_v4_32.py --model ~/models/gemma-3-12b-it --data gs://b/data/train.jsonl "
      "--steps 20")
  assert (REPO_ROOT / "experiments" / "configs" / "gemma3_12b_v4_32.py").exists()


def test_default_config_loads_and_is_a_v5e16_run():
  from experiments.lib.run_config import load_config

  default = re.search(r'CONFIG:=([^}]+)}', (TPU / "common.sh").read_text()).group(1)
  cfg = load_config(str(REPO_ROOT / default))
  assert "v5e16" in default and cfg.model and cfg.hbm_gib == 16.0
  assert re.search(r'ACCELERATOR_TYPE:=v5litepod-16}', (TPU / "common.sh").read_text())


def test_resume_dry_run_is_teardown_create_setup_launch():
  lines = dry_run("resume.sh")
  verbs = [next(w for w in ("delete", "create", "scp", "ssh", "tar") if w in l.split()) for l in lines]
  assert verbs == ["delete", "create", "tar", "scp", "ssh", "ssh"]


def test_missing_project_fails_clearly():
  env = {k: v for k, v in os.environ.items() if k != "PROJECT"} | {"PATH": "/usr/bin:/bin", "PROJECT": "",
                                                                   "ZONE": "us-west4-a"}
  result = subprocess.run(["bash", str(TPU / "create.sh")], capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 2 and "set PROJECT" in result.stderr


def test_missing_zone_fails_before_any_gcloud_call(fake):
  for script in ("create.sh", "launch.sh", "resume.sh", "preflight.sh"):
    result = fake.run(script, ZONE="")
    assert result.returncode == 2 and "No zone: set ZONE" in result.stderr, (script, result.stderr)
  assert fake.verbs() == []


def test_worker_all_needs_a_key_in_ssh_agent(fake):
  env = {k: v for k, v in fake.env.items() if k != "SSH_AUTH_SOCK"} | {"CHECK_SSH_AGENT": "1"}
  result = subprocess.run(["bash", str(TPU / "launch.sh")], capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 2 and "ssh-add ~/.ssh/google_compute_engine" in result.stderr
  assert fake.calls() == []


def test_setup_installs_python311_venv_once_then_ships_code_only(fake):
  first = fake.run("setup.sh")
  assert first.returncode == 0, first.stderr + first.stdout
  assert first.stdout.count("setup: installed") == 2
  for i in range(2):
    venv = fake.home(i) / "mos_jax" / ".venv"
    stamp = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes() + (TPU / "constraints.txt").read_bytes()
                           + b"jax[tpu]==0.10.2\n").hexdigest()
    assert (venv / ".mos-tpu-installed").read_text().strip() == stamp
    assert (fake.home(i) / "mos_jax" / "experiments" / "train.py").exists()
    assert fake.worker_status(i) == "IDLE"
    # Every install pinned by the constraints file; Tunix and qwix without their declared deps.
    calls = (venv / "pip-calls").read_text().splitlines()
    installs = [c for c in calls if c.startswith("install") and "--upgrade pip" not in c]
    assert len(installs) == 2 and all(f"-c {fake.home(i)}/mos_jax/tpu/constraints.txt" in c for c in installs)
    assert "jax[tpu]==0.10.2" in installs[0] and "[experiments,gcs]" in installs[0]
    assert "--no-deps" in installs[1] and "google-tunix==0.1.7" in installs[1] and "qwix==0.1.8" in installs[1]
  again = fake.run("setup.sh")
  assert again.returncode == 0 and again.stdout.count("is up to date") == 2, again.stdout


def test_launch_returns_at_once_and_stop_terminates_only_training(fake):
  assert fake.run("setup.sh").returncode == 0
  launch = fake.run("launch.sh", FAKE_TRAIN_STEPS="100000", FAKE_STEP_SECONDS="0.1", TRAIN_ARGS="--steps 7")
  assert launch.returncode == 0, launch.stderr + launch.stdout
  assert launch.seconds < 2, launch.seconds  # ssh's channel closes: nothing detached keeps it open
  for i in range(2):
    assert fake.worker_status(i) == "RUNNING"
  log = fake.home(0) / "mos_run" / "train.log"
  assert ("-m experiments.train --workdir gs://b/run --no-progress --config experiments/configs/gemma3_4b_v5e16.py "
          "--steps 7") in log.read_text()
  again = fake.run("launch.sh")
  assert again.returncode != 0 and "already running" in again.stdout + again.stderr
  stop = fake.run("stop.sh")
  # The remote `bash -c` running the stop survives it (a `pkill -f` pattern would have matched it: 143).
  assert stop.returncode == 0, stop.stdout + stop.stderr
  assert stop.stdout.count("training exited with status 143") == 2
  for i in range(2):
    assert fake.worker_status(i) == "EXITED 143"
    assert "preempted, saved step" in (fake.home(i) / "mos_run" / "train.log").read_text()


def test_setup_copies_the_weights_and_launch_points_training_at_them(fake):
  bucket = fake.root / "gcs" / "b" / "models" / "gemma-3-4b-it"
  bucket.mkdir(parents=True)
  files = ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
           "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja")
  for name in (*files, "pytorch_model.bin", "README.md"):
    (bucket / name).write_text(name)
  setup = fake.run("setup.sh", MODEL_SRC="gs://b/models/gemma-3-4b-it")
  assert setup.returncode == 0, setup.stdout + setup.stderr
  for i in range(2):
    weights = fake.home(i) / "models" / "gemma-3-4b-it"
    # Safetensors, configs and tokenizer only: never the .bin copy of the same weights.
    assert sorted(p.name for p in weights.iterdir()) == sorted([".complete", *files])
  launch = fake.run("launch.sh", MODEL_SRC="gs://b/models/gemma-3-4b-it")
  assert launch.returncode == 0, launch.stderr
  fake.wait_status("EXITED 0")
  assert f"--model {fake.home(0)}/models/gemma-3-4b-it" in (fake.home(0) / "mos_run" / "train.log").read_text()


def test_hub_weights_get_the_token_as_a_private_file(fake):
  token = fake.root / "token"
  token.write_text("hf_secret")
  setup = fake.run("setup.sh", MODEL_SRC="hf://meta-llama/Llama-2-7b-hf", HF_TOKEN_FILE=str(token))
  assert setup.returncode == 0, setup.stdout + setup.stderr
  assert not any("hf_secret" in arg for call in fake.calls() for arg in call)  # never on a command line
  for i in range(2):
    weights = fake.home(i) / "models" / "Llama-2-7b-hf"
    assert (weights / "token-used").read_text() == "hf_secret"
    assert (weights / "config.json").read_text().strip() == "meta-llama/Llama-2-7b-hf"
    assert (weights / "hf-args").read_text().split()[-5:] == ["--include", "*.safetensors", "*.json", "*.jinja",
                                                               "tokenizer*"]
    assert oct((fake.home(i) / ".cache" / "huggingface" / "token").stat().st_mode & 0o777) == "0o600"
  missing = fake.run("setup.sh", MODEL_SRC="hf://meta-llama/Llama-2-7b-hf", HF_TOKEN_FILE=str(fake.root / "none"))
  assert missing.returncode == 2 and "hf auth login" in missing.stderr


def test_launch_ends_stale_tpu_holders_first(fake, tmp_path):
  assert fake.run("setup.sh").returncode == 0
  device = tmp_path / "accel0"
  device.write_text("")
  with device.open() as f:  # closed here at once: only the orphan below holds the "TPU"
    holder = subprocess.Popen(["sleep", "300"], stdin=f)
  try:
    launch = fake.run("launch.sh", TPU_DEVICE_FILES=str(device))
    assert launch.returncode == 0, launch.stderr
    assert holder.wait(timeout=10) == -9 and f"ending stale TPU holder {holder.pid}" in launch.stdout
  finally:
    if holder.poll() is None:
      holder.kill()


def test_create_retries_only_while_the_zone_has_no_capacity(fake):
  fake.script("create.results", "capacity", "capacity", "ok")
  result = fake.run("create.sh", QUEUED="0")
  assert result.returncode == 0 and fake.verbs() == ["tpu-vm describe"] + ["tpu-vm create"] * 3, result.stderr
  fake.clear()
  fake.script("create.results", "capacity")
  result = fake.run("create.sh", QUEUED="0", CREATE_RETRIES="2")
  assert result.returncode == 1 and "still no capacity after 2 tries" in result.stderr


def test_create_waits_for_the_queued_resource(fake):
  fake.script("queued-resources.states", "NOT_FOUND", "ERROR", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  result = fake.run("create.sh")
  assert result.returncode == 0 and "is ACTIVE" in result.stdout, result.stderr
  assert fake.verbs() == ["queued-resources describe", "queued-resources create"] + ["queued-resources describe"] * 4


def test_create_is_idempotent_for_an_existing_queued_resource(fake):
  fake.script("queued-resources.states", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  result = fake.run("create.sh")
  assert result.returncode == 0 and "already exists (WAITING_FOR_RESOURCES)" in result.stdout, result.stderr
  assert "queued-resources create" not in fake.verbs()
  fake.clear()
  fake.script("queued-resources.states", "SUSPENDED")
  result = fake.run("create.sh")
  assert result.returncode == 1 and "delete it first" in result.stderr
  assert "queued-resources create" not in fake.verbs()
  fake.clear()
  fake.script("tpu-vm.states", "READY")
  result = fake.run("create.sh", QUEUED="0")
  assert result.returncode == 0 and "already exists (READY)" in result.stdout
  assert fake.verbs() == ["tpu-vm describe"]


def resume(fake, timeout=60, **env):
  result = fake.run("resume.sh", timeout=timeout, **env)
  decisions = [v for v in fake.verbs() if not v.endswith("describe")]
  return result, decisions


def test_resume_recreates_after_preemption_and_finishes(fake):
  """READY + running -> PREEMPTED: delete, create, set up the fresh VMs, relaunch; then done."""
  assert fake.run("setup.sh").returncode == 0
  assert fake.run("launch.sh", FAKE_TRAIN_STEPS="100000").returncode == 0
  fake.clear()
  fake.script("tpu-vm.states", "READY", "PREEMPTED", "CREATING", "READY")
  result, decisions = resume(fake, QUEUED="0", FAKE_TRAIN_STEPS="3")
  assert result.returncode == 0 and "training finished" in result.stdout, result.stdout + result.stderr
  assert decisions[:3] == ["tpu-vm ssh", "tpu-vm delete", "tpu-vm create"], decisions
  # Then: status on worker 0 (NOT_INSTALLED), setup (scp + ssh), launch, and statuses until EXITED 0.
  assert decisions[3:7] == ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"], decisions
  # Done: every worker's log goes to the bucket, then the slice is deleted (billing stops).
  assert decisions[-2:] == ["tpu-vm ssh", "tpu-vm delete"] and "delete" not in " ".join(decisions[3:-1])
  for i in range(2):
    assert "training finished" in (fake.root / "gcs" / "b" / "run" / "logs" / f"worker-{i}.log").read_text()


def test_resume_never_deletes_for_a_transient_gcloud_error(fake):
  assert fake.run("setup.sh").returncode == 0
  fake.script("tpu-vm.states", "ERROR", "ERROR", "READY")
  result, decisions = resume(fake, QUEUED="0", FAKE_TRAIN_STEPS="1", KEEP_SLICE="1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert not any(d.endswith(("delete", "create")) for d in decisions), decisions
  assert "UNAVAILABLE" in result.stderr and "leaving the slice up (KEEP_SLICE=1)" in result.stdout


def test_resume_recreates_a_suspended_queued_resource(fake):
  fake.script("queued-resources.states", "SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  fake.script("tpu-vm.states", "READY")
  result, decisions = resume(fake, FAKE_TRAIN_STEPS="1", KEEP_SLICE="1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert decisions[:2] == ["queued-resources delete", "queued-resources create"], decisions
  create = next(c for c in fake.calls() if c[2:4] == ["queued-resources", "create"])
  assert "--spot" in create and "--node-id=mos-jax" in create
  assert decisions.count("queued-resources create") == 1


def test_resume_recreates_a_slice_stuck_repairing(fake):
  assert fake.run("setup.sh").returncode == 0
  fake.clear()
  fake.script("tpu-vm.states", *["REPAIRING"] * 12, "READY")  # 12 polls span more than a second
  result, decisions = resume(fake, QUEUED="0", STUCK_SECONDS="1", FAKE_TRAIN_STEPS="1", KEEP_SLICE="1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert decisions[:2] == ["tpu-vm delete", "tpu-vm create"], decisions


def test_resume_relaunches_after_a_crash_then_gives_up(fake):
  assert fake.run("setup.sh").returncode == 0
  fake.script("tpu-vm.states", "READY")
  result, decisions = resume(fake, QUEUED="0", FAKE_TRAIN_STEPS="1", FAKE_TRAIN_EXIT="1", MAX_FAILURES="2")
  assert result.returncode == 1 and "failed 3 times (EXITED 1)" in result.stdout, result.stdout
  launches = [c for c in fake.calls() if c[3:4] == ["ssh"] and "worker.sh launch" in c[-1]]
  assert len(launches) == 3 and not any(d.endswith("create") for d in decisions)
  # Giving up deletes the slice too (a failing run must not keep billing), after saving the logs.
  assert decisions[-2:] == ["tpu-vm ssh", "tpu-vm delete"] and decisions.count("tpu-vm delete") == 1
  log = (fake.root / "gcs" / "b" / "run" / "logs" / "worker-1.log").read_text()
  assert log.count("=== ") == 3  # three launches, appended to one log


def test_resume_stops_and_deletes_after_the_maximum_run_time(fake):
  assert fake.run("setup.sh").returncode == 0
  assert fake.run("launch.sh", FAKE_TRAIN_STEPS="100000").returncode == 0
  fake.script("tpu-vm.states", "READY")
  result, decisions = resume(fake, QUEUED="0", MAX_RUN_SECONDS="1")
  assert result.returncode == 3 and "out of time" in result.stdout, result.stdout + result.stderr
  for i in range(2):  # training was checkpointed (SIGTERM, exit 143) before the slice went
    assert fake.worker_status(i) == "EXITED 143"
  assert decisions[-1] == "tpu-vm delete"


def test_resume_restarts_training_that_stopped_logging(fake):
  """A hung run (a dead peer, a stuck collective) ignores SIGTERM: the watchdog kills and relaunches it."""
  assert fake.run("setup.sh").returncode == 0
  fake.script("tpu-vm.states", "READY")
  result, decisions = resume(fake, QUEUED="0", FAKE_HANG_ONCE="1", FAKE_TRAIN_STEPS="2", WATCHDOG_SECONDS="2",
                             HUNG_STOP_TIMEOUT="1", KEEP_SLICE="1", timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "no log line for" in result.stdout and "training finished" in result.stdout
  log = (fake.home(0) / "mos_run" / "train.log").read_text()
  assert "ignored SIGTERM" in (result.stdout + result.stderr) or log.count("=== ") == 2
  assert log.count("=== ") == 2 and "training finished at step 2" in log


def test_preflight_catches_runtime_bucket_and_model_source_problems(fake):
  ok = fake.run("preflight.sh")
  assert ok.returncode == 0 and "is writable" in ok.stdout, ok.stderr
  assert list((fake.root / "gcs" / "b" / "run").glob(".preflight-*")) == []  # the test object is deleted
  bad = fake.run("preflight.sh", ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="tpu-ubuntu2204-base")
  assert bad.returncode == 2 and "use v2-alpha-tpuv5-lite" in bad.stderr
  bad = fake.run("preflight.sh", FAKE_BUCKET_DENY="1")
  assert bad.returncode == 2 and "cannot write to gs://b/run" in bad.stderr
  bad = fake.run("preflight.sh", WORKDIR="/tmp/run")
  assert bad.returncode == 2 and "must be a bucket path" in bad.stderr
  bad = fake.run("preflight.sh", MODEL_SRC="/data/models/x")
  assert bad.returncode == 2 and "gs://BUCKET/PATH or hf://ORG/NAME" in bad.stderr
  bad = fake.run("preflight.sh", DATA="gs://b/data/missing.jsonl")
  assert bad.returncode == 2 and "is not readable" in bad.stderr
  # launch.sh runs it first: a bad bucket stops it before any ssh.
  fake.clear()
  bad = fake.run("launch.sh", FAKE_BUCKET_DENY="1")
  assert bad.returncode == 2 and fake.verbs() == []
