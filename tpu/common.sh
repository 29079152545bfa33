#!/usr/bin/env bash
# Shared settings and helpers for the tpu/ scripts. Override any variable in the environment.
# DRY_RUN=1 (or --dry-run on any script) prints each command instead of running it.

: "${TPU_NAME:=mos-jax}"
: "${ZONE:=us-central2-b}"                     # v4; for v5e use e.g. us-west4-a
: "${ACCELERATOR_TYPE:=v4-8}"                  # v4-8 (4 chips, 1 host) or v5litepod-16 (16 chips, 4 hosts)
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"    # v5e: v2-alpha-tpuv5-lite
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || true)}"
: "${REPO_DIR:=mos_jax}"                       # checkout folder on every worker
: "${CONFIG:=experiments/configs/llama2_7b_v4.py}"
: "${WORKDIR:=gs://my-bucket/mos_jax/run1}"    # shared by all workers: checkpoints + metrics
: "${JAX_TPU_SPEC:=jax[tpu]==0.10.2}"
: "${SPOT:=1}"                                 # spot/preemptible capacity; resume.sh restarts it
DRY_RUN="${DRY_RUN:-0}"

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; fi
done
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

# Runs a shell snippet on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
    --command="$1"
}
