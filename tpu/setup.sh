#!/usr/bin/env bash
# Copies this checkout to every worker and installs it (the project's Makefile + JAX for TPU).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

root="$(cd "$(dirname "$0")/.." && pwd)"
archive="/tmp/${REPO_DIR}.tar.gz"
run tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf "$archive" .
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/" --zone="$ZONE" --project="$PROJECT" --worker=all
on_all_workers "set -e; mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf /tmp/${REPO_DIR}.tar.gz \
  && cd ~/$REPO_DIR && make install && .venv/bin/pip install -q '$JAX_TPU_SPEC'"
