#!/usr/bin/env bash
# Shared settings and helpers for the tpu/ scripts. Override any variable in the environment.
# DRY_RUN=1 (or --dry-run on any script) prints each gcloud command instead of running it.

: "${TPU_NAME:=mos-jax}"                       # the TPU VM / slice (the node id)
: "${ZONE:=}"                                  # required: v4 us-central2-b; v5e e.g. us-west4-a, us-east5-a
: "${ACCELERATOR_TYPE:=v5litepod-16}"          # v4-8 (1 host), v4-32 or v5litepod-16 (16 chips on 4 hosts)
: "${RUNTIME_VERSION:=}"                       # default: the one for ACCELERATOR_TYPE (runtime_for below)
: "${SPOT:=1}"                                 # Spot capacity (preemptible, much cheaper); 0 = on demand
: "${QUEUED:=1}"                               # create through a queued resource (Google's advice for Spot)
: "${QR_NAME:=$TPU_NAME}"                      # the queued resource's id
: "${QUEUE_VALID_FOR:=}"                       # e.g. 12h: the queued request expires if not served by then
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || true)}"
: "${REPO_DIR:=mos_jax}"                       # checkout folder in each worker's home
: "${CONFIG:=experiments/configs/gemma3_4b_v5e16.py}"
: "${WORKDIR:=gs://my-bucket/mos_jax/run1}"    # shared by all workers: checkpoints, metrics, logs/
: "${DATA:=}"                                  # instruction rows (JSONL/Parquet), gs://...; default: CONFIG's
: "${TRAIN_ARGS:=}"                            # more experiments.train flags, e.g. "--steps 2000"
: "${MODEL_SRC:=}"                             # weights to copy to every worker: gs://... or hf://ORG/NAME
: "${MODEL_DIR:=models/${MODEL_SRC##*/}}"      # where they go, relative to each worker's home
: "${HF_TOKEN_FILE:=$HOME/.cache/huggingface/token}"  # for hf:// weights (`hf auth login` writes it)
: "${JAX_TPU_SPEC:=jax[tpu]==0.10.2}"
: "${KEEP_SLICE:=0}"                           # 1: resume.sh leaves the slice up when it stops
: "${MAX_RUN_HOURS:=48}"                       # resume.sh checkpoints, stops and deletes the slice after this
: "${WATCHDOG_MINUTES:=30}"                    # no log line for this long while RUNNING: restart training
: "${LOG_UPLOAD_SECONDS:=300}"                 # each worker copies its log to $WORKDIR/logs/ this often
: "${CHECK_SSH_AGENT:=1}"
DRY_RUN="${DRY_RUN:-0}"

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; fi
done
# The Cloud TPU runtime (VM image) each accelerator generation needs (Google's TPU software versions page).
runtime_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "" ;;
  esac
}
if [[ -z "$RUNTIME_VERSION" ]]; then RUNTIME_VERSION="$(runtime_for "$ACCELERATOR_TYPE")"; fi
if [[ -z "$ZONE" ]]; then
  if [[ "$DRY_RUN" != "1" ]]; then
    echo "No zone: set ZONE (v4: us-central2-b; v5e: e.g. us-west4-a). A TPU type is offered only in some zones." >&2
    exit 2
  fi
  ZONE="ZONE"
fi
if [[ -z "$PROJECT" ]]; then
  if [[ "$DRY_RUN" != "1" ]]; then
    echo "No GCP project: set PROJECT=<project id> or run 'gcloud config set project <id>'." >&2
    exit 2
  fi
  PROJECT="my-project"
fi

# Runs a command, or prints it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Quotes one word for the remote shell.
q() {
  printf '%q' "$1"
}

# The worker-side helper (tpu/worker.sh in the copied checkout), as a remote command prefix.
worker_sh() {
  printf 'bash ~/%s/tpu/worker.sh' "$(q "$REPO_DIR")"
}

# Runs a shell snippet over ssh on worker $1 (a number, or "all": every worker at once).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker="$1" \
    --command="$2"
}

# `--worker=all` opens one ssh connection per worker at once: gcloud needs the key in ssh-agent.
require_ssh_agent() {
  if [[ "$DRY_RUN" == "1" || "$CHECK_SSH_AGENT" != "1" ]]; then return 0; fi
  if ! ssh-add -l >/dev/null 2>&1; then
    echo "ssh-agent has no key: run 'eval \"\$(ssh-agent -s)\"; ssh-add ~/.ssh/google_compute_engine'" \
      "(gcloud creates that key at the first 'gcloud compute tpus tpu-vm ssh')." >&2
    exit 2
  fi
}

# Prints the value of FIELD of a TPU resource (tpu-vm or queued-resources), NOT_FOUND when it does
# not exist, or ERROR when gcloud failed otherwise (network, auth, API): callers must not treat a
# transient ERROR as a missing slice.
describe_field() {
  local kind=$1 name=$2 field=$3 err out
  err="$(mktemp)"
  if out="$(gcloud compute tpus "$kind" describe "$name" --zone="$ZONE" --project="$PROJECT" \
              --format="value($field)" 2>"$err")"; then
    echo "${out:-UNKNOWN}"
  elif grep -q "NOT_FOUND" "$err"; then
    echo "NOT_FOUND"
  else
    echo "gcloud describe failed: $(tr '\n' ' ' <"$err" | cut -c1-300)" >&2
    echo "ERROR"
  fi
  rm -f "$err"
}

node_state() { describe_field tpu-vm "$TPU_NAME" state; }
qr_state() { describe_field queued-resources "$QR_NAME" state.state; }
