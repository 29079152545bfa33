#!/usr/bin/env bash
# Copies this checkout to every worker and installs it there (tpu/worker.sh setup: Python 3.11
# venv with the project, gcsfs and jax[tpu]; skipped when pyproject.toml and JAX_TPU_SPEC are
# unchanged, so re-running setup.sh just ships code changes). With MODEL_SRC set, every worker
# also copies the weights to ~/$MODEL_DIR: from gs://... (the VMs' service account needs read
# access) or from the Hugging Face hub, hf://ORG/NAME, with the token in $HF_TOKEN_FILE.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
require_ssh_agent

root="$(cd "$(dirname "$0")/.." && pwd)"
archive="${TMPDIR:-/tmp}/${REPO_DIR}.tar.gz"
run tar -C "$root" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ -czf "$archive" .
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$REPO_DIR.tar.gz" --zone="$ZONE" --project="$PROJECT" \
  --worker=all
# shellcheck disable=SC2088  # a tilde for the remote shell to expand
dir="~/$(q "$REPO_DIR")"
on_workers all "set -e; mkdir -p $dir; tar -C $dir -xzf $dir.tar.gz; $(worker_sh) setup $(q "$JAX_TPU_SPEC")"

if [[ -n "$MODEL_SRC" ]]; then
  if [[ "$MODEL_SRC" == hf://* ]]; then
    if [[ "$DRY_RUN" != "1" && ! -f "$HF_TOKEN_FILE" ]]; then
      echo "$MODEL_SRC needs a Hugging Face token in $HF_TOKEN_FILE: run 'hf auth login' (or set HF_TOKEN_FILE)." >&2
      exit 2
    fi
    # A file, not a command-line argument: the token never shows in process lists or logs.
    run gcloud compute tpus tpu-vm scp "$HF_TOKEN_FILE" "$TPU_NAME:.hf_token" --zone="$ZONE" --project="$PROJECT" \
      --worker=all
  fi
  on_workers all "$(worker_sh) fetch-weights $(q "$MODEL_SRC") ~/$(q "$MODEL_DIR")"
fi
