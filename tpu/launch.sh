#!/usr/bin/env bash
# Starts training on every worker and returns at once (tpu/worker.sh launch: ends stale processes
# holding the TPU, then runs `python -m experiments.train` detached, appending to ~/mos_run/train.log,
# which it copies to $WORKDIR/logs/). JAX finds its peers from the TPU metadata; training resumes from
# $WORKDIR's latest checkpoint.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
require_ssh_agent
if [[ "${PREFLIGHT:-1}" == "1" ]]; then bash "$(dirname "$0")/preflight.sh" "$@" >&2; fi

command="$(worker_sh) launch $(q "$WORKDIR") --config $(q "$CONFIG")"
if [[ -n "$MODEL_SRC" ]]; then
  command+=" --model ~/$(q "$MODEL_DIR")"  # where setup.sh put the weights
fi
if [[ -n "$DATA" ]]; then
  command+=" --data $(q "$DATA")"
fi
read -ra extra <<<"$TRAIN_ARGS"
for arg in "${extra[@]}"; do
  command+=" $(q "$arg")"
done
on_workers all "LOG_UPLOAD_SECONDS=$(q "$LOG_UPLOAD_SECONDS") $command"
