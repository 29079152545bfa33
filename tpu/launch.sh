#!/usr/bin/env bash
# Starts training on every worker and returns at once (tpu/worker.sh launch: ends stale processes
# holding the TPU, then runs experiments/train_sharded.py detached, logging to ~/mos_run/train.log).
# JAX finds its peers from the TPU metadata; training resumes from $WORKDIR's latest checkpoint.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
require_ssh_agent

command="$(worker_sh) launch $(q "$CONFIG") $(q "$WORKDIR")"
if [[ -n "$MODEL_SRC" ]]; then
  command+=" --hf-model ~/$(q "$MODEL_DIR")"  # where setup.sh put the weights
fi
read -ra extra <<<"$TRAIN_ARGS"
for arg in "${extra[@]}"; do
  command+=" $(q "$arg")"
done
on_workers all "$command"
