#!/usr/bin/env bash
# Streams the training log of worker 0 (the process that writes metrics).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
  --command="tail -n 100 -f ~/train.log"
