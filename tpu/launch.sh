#!/usr/bin/env bash
# Starts training on every worker; JAX finds its peers from the TPU metadata. Resumes from the
# latest checkpoint in $WORKDIR if there is one. Logs go to ~/train.log on each worker.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

on_all_workers "cd ~/$REPO_DIR && nohup .venv/bin/python -m experiments.train_sharded \
  --config $CONFIG --workdir $WORKDIR > ~/train.log 2>&1 &"
