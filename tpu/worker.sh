#!/usr/bin/env bash
# Runs ON each TPU VM worker; the tpu/*.sh scripts call it over ssh from the copied checkout.
#
#   worker.sh setup [JAX_TPU_SPEC]              Python 3.11 venv: the project (pinned by tpu/constraints.txt),
#                                               gcsfs, Tunix and qwix, jax[tpu]
#   worker.sh fetch-weights SRC DEST            copy gs://... or hf://ORG/NAME weights (safetensors only) to DEST
#   worker.sh launch WORKDIR [ARGS...]          end stale TPU holders, start experiments.train detached
#   worker.sh stop [--force]                    SIGTERM training and wait (--force: SIGKILL after STOP_TIMEOUT)
#   worker.sh status [--age]                    NOT_INSTALLED | IDLE | RUNNING [seconds since the log last grew]
#                                               | EXITED <status>
#   worker.sh upload-logs WORKDIR               copy the log to WORKDIR/logs/worker-<N>.log
#   worker.sh logs                              follow the training log
#
# One training process per worker, tracked by files in $MOS_STATE_DIR (default ~/mos_run): the
# pid of the wrapper that runs it, the training process's pid, its exit status and its log. The log
# is appended to (each launch starts with a header line), and the wrapper copies it to
# $WORKDIR/logs/ every LOG_UPLOAD_SECONDS and when training exits, so it outlives a preempted VM.
# Processes are found by pid, never by matching command lines (`pkill -f` would match the very
# shell that runs it).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${MOS_STATE_DIR:-$HOME/mos_run}"
pid_file="$state/train.pid"
child_file="$state/train.child"
exit_file="$state/train.exit"
log_file="$state/train.log"
stamp="$repo/.venv/.mos-tpu-installed"
constraints="$repo/tpu/constraints.txt"
: "${UV_SPEC:=uv==0.13.9}"
: "${STOP_TIMEOUT:=600}"
: "${LOG_UPLOAD_SECONDS:=300}"
# Tunix's and qwix's model code, installed without their declared deps (TensorFlow datasets, grain, ...).
: "${NO_DEPS_SPECS:=google-tunix==0.1.7 qwix==0.1.8}"
sudo=()
if [[ "$EUID" -ne 0 ]]; then sudo=(sudo -n); fi

die() {
  echo "worker.sh: $*" >&2
  exit 1
}

# A Python 3.11: $MOS_PYTHON, python3.11 on PATH, else one that uv installs (the TPU VM images ship
# Python 3.10; uv needs no apt or PPA, whose locks unattended-upgrades often holds on a fresh VM).
find_python() {
  if [[ -n "${MOS_PYTHON:-}" ]]; then echo "$MOS_PYTHON"; return; fi
  if command -v python3.11 >/dev/null; then command -v python3.11; return; fi
  local uv="$HOME/.local/bin/uv"
  if [[ ! -x "$uv" ]]; then
    python3 -m pip install --user -q "$UV_SPEC" >&2 || die "could not pip-install $UV_SPEC (is python3-pip there?)"
  fi
  "$uv" python install 3.11 >&2
  "$uv" python find 3.11
}

setup() {
  local spec="${1:-jax[tpu]==0.10.2}" want python no_deps
  # Rebuild only when the dependencies changed; re-running setup then only ships code.
  want="$({ cat "$repo/pyproject.toml" "$constraints"; printf '%s\n' "$spec"; } | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup: $repo/.venv is up to date"
    return
  fi
  python="$(find_python)"
  rm -rf "$repo/.venv"
  "$python" -m venv "$repo/.venv"
  "$repo/.venv/bin/pip" install -q --upgrade pip
  # [experiments]: what experiments/ imports; [gcs]: gcsfs, for gs:// workdirs; libtpu comes with jax[tpu].
  # Every version pinned by the constraints file: each worker gets the same packages as the test suite.
  "$repo/.venv/bin/pip" install -q -c "$constraints" -e "${repo}[experiments,gcs]" "$spec"
  read -ra no_deps <<<"$NO_DEPS_SPECS"
  "$repo/.venv/bin/pip" install -q --no-deps -c "$constraints" "${no_deps[@]}"
  echo "$want" >"$stamp"
  echo "setup: installed $repo/.venv ($("$repo/.venv/bin/python" --version))"
}

fetch_weights() {
  local src="$1" dest="$2"
  if [[ -f "$dest/.complete" ]]; then echo "weights: $dest is there"; return; fi
  mkdir -p "$dest"
  case "$src" in
    gs://*)
      # Safetensors, configs and tokenizer files only: never a folder's PyTorch .bin copy of the weights.
      local wanted=()
      mapfile -t wanted < <(gcloud storage ls "${src%/}/" | grep -E '(\.safetensors|\.json|\.jinja|/tokenizer\.model)$')
      ((${#wanted[@]})) || die "no safetensors or config in $src"
      gcloud storage cp "${wanted[@]}" "$dest/" ;;
    hf://*)
      if [[ -f "$HOME/.hf_token" ]]; then  # sent by setup.sh; where huggingface_hub reads it
        mkdir -p "$HOME/.cache/huggingface"
        install -m 600 "$HOME/.hf_token" "$HOME/.cache/huggingface/token"
        rm -f "$HOME/.hf_token"
      fi
      # Safetensors only (a hub folder may also hold the same weights as .bin or .pth: twice the download).
      "$repo/.venv/bin/hf" download "${src#hf://}" --local-dir "$dest" --include "*.safetensors" "*.json" \
        "*.jinja" "tokenizer*" ;;
    *) die "weights must come from gs://BUCKET/PATH or hf://ORG/NAME, not $src" ;;
  esac
  touch "$dest/.complete"
}

running() {
  local pid
  [[ -f "$pid_file" ]] || return 1
  pid="$(cat "$pid_file")"
  # The pid could have been reused since: check that it is still our wrapper.
  kill -0 "$pid" 2>/dev/null && grep -qa "experiments.train" "/proc/$pid/cmdline" 2>/dev/null
}

# Whether process $1 exists and is not a zombie (a killed process whose parent has not reaped it).
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ "$(sed -E 's/.*\) (.).*/\1/' <<<"$stat")" != "Z" ]]
}

# Processes holding the TPU (a crashed or orphaned run) make the next one fail to start: end
# them, as MaxText's launcher does. TPU_DEVICE_FILES overrides the device files (tests).
kill_stale() {
  local devices=() pids pid
  if [[ -n "${TPU_DEVICE_FILES:-}" ]]; then
    read -ra devices <<<"$TPU_DEVICE_FILES"
  else
    shopt -s nullglob
    devices=(/dev/accel* /dev/vfio/[0-9]*)  # v2-v4 chips; v5e and later
    shopt -u nullglob
  fi
  if ((${#devices[@]} == 0)); then return 0; fi
  if ! command -v lsof >/dev/null; then
    echo "worker.sh: lsof missing; not checking for stale TPU holders" >&2
    return 0
  fi
  pids="$("${sudo[@]}" lsof -t "${devices[@]}" 2>/dev/null | sort -u || true)"
  for pid in $pids; do
    echo "ending stale TPU holder $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    "${sudo[@]}" kill -9 "$pid" 2>/dev/null || true
  done
  for pid in $pids; do
    local deadline=$((SECONDS + 30))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  done
  "${sudo[@]}" rm -f /tmp/libtpu_lockfile
}

# This worker's index in the slice: $MOS_WORKER_ID, else the TPU metadata's agent-worker-number.
worker_id() {
  if [[ -n "${MOS_WORKER_ID:-}" ]]; then echo "$MOS_WORKER_ID"; return; fi
  curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number" 2>/dev/null \
    || hostname
}

upload_logs() {
  local workdir="$1" target
  [[ -f "$log_file" ]] || return 0
  target="${workdir%/}/logs/worker-$(worker_id).log"
  if [[ "$workdir" == gs://* ]]; then
    gcloud storage cp "$log_file" "$target" >/dev/null 2>&1 || echo "worker.sh: could not upload the log to $target" >&2
  else
    mkdir -p "$(dirname "$target")" && cp "$log_file" "$target"
  fi
}

launch() {
  (($# >= 1)) || die "usage: worker.sh launch WORKDIR [TRAIN_ARGS...]"
  local workdir="$1"
  shift
  [[ -x "$repo/.venv/bin/python" ]] || die "no $repo/.venv: run tpu/setup.sh first"
  mkdir -p "$state"
  if running; then
    die "training is already running (pid $(cat "$pid_file")): tpu/stop.sh first"
  fi
  kill_stale
  rm -f "$exit_file" "$child_file"
  cd "$repo"
  echo "=== $(date -u +%FT%TZ) launch on worker $(worker_id): experiments.train --workdir $workdir $*" >>"$log_file"
  # Detached: its own session (outlives this ssh session) and no descriptor shared with ssh, whose
  # channel closes, so ssh returns at once. The wrapper records training's pid and exit status and
  # copies the log to the bucket now and then (a preempted VM's disk is gone) and at the end.
  # shellcheck disable=SC2016  # expanded by the wrapper shell, not here
  setsid nohup bash -c '
    state=$1 workdir=$2 every=$3 helper=$4; shift 4
    (while sleep "$every"; do bash "$helper" upload-logs "$workdir"; done) &
    uploader=$!
    "$@" &
    echo "$!" >"$state/train.child"
    wait "$!"
    status=$?
    kill "$uploader" 2>/dev/null
    bash "$helper" upload-logs "$workdir"
    echo "$status" >"$state/train.exit"' \
    wrapper "$state" "$workdir" "$LOG_UPLOAD_SECONDS" "$repo/tpu/worker.sh" \
    "$repo/.venv/bin/python" -m experiments.train --workdir "$workdir" --no-progress "$@" \
    >>"$log_file" 2>&1 </dev/null &
  echo "$!" >"$pid_file"
  echo "launched training (wrapper pid $!); log: $log_file"
}

stop() {
  local wrapper child deadline=$((SECONDS + STOP_TIMEOUT)) force="${1:-}"
  if ! running; then
    echo "no training running"
    return 0
  fi
  wrapper="$(cat "$pid_file")"
  child="$(cat "$child_file" 2>/dev/null || true)"
  # SIGTERM to training only: the wrapper lives on to record the exit status and upload the log.
  kill -TERM "${child:-$wrapper}" 2>/dev/null || true
  while running; do
    if ((SECONDS >= deadline)); then
      if [[ "$force" == "--force" && -n "$child" ]]; then
        echo "training ignored SIGTERM for $STOP_TIMEOUT s (hung?): SIGKILL"
        kill -KILL "$child" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        force=""
        continue
      fi
      die "training still running after $STOP_TIMEOUT s (pid ${child:-$wrapper})"
    fi
    sleep 0.2
  done
  echo "training exited with status $(cat "$exit_file" 2>/dev/null || echo unknown)"
}

status() {
  if [[ ! -x "$repo/.venv/bin/python" || ! -f "$stamp" ]]; then
    echo "NOT_INSTALLED"
  elif running; then
    if [[ "${1:-}" == "--age" ]]; then
      echo "RUNNING $(($(date +%s) - $(stat -c %Y "$log_file" 2>/dev/null || date +%s)))"
    else
      echo "RUNNING"
    fi
  elif [[ -f "$exit_file" ]]; then
    echo "EXITED $(cat "$exit_file")"
  elif [[ -f "$pid_file" ]]; then
    echo "EXITED unknown"  # the wrapper itself was killed
  else
    echo "IDLE"
  fi
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  fetch-weights) shift; (($# == 2)) || die "usage: worker.sh fetch-weights SRC DEST"; fetch_weights "$@" ;;
  launch) shift; launch "$@" ;;
  stop) shift; stop "$@" ;;
  status) shift; status "$@" ;;
  upload-logs) shift; (($# == 1)) || die "usage: worker.sh upload-logs WORKDIR"; upload_logs "$1" ;;
  logs) exec tail -n "${LOG_LINES:-100}" -F "$log_file" ;;
  *) die "usage: worker.sh setup|fetch-weights|launch|stop|status|upload-logs|logs (see the header of $0)" ;;
esac
