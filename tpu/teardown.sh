#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (checkpoints in $WORKDIR stay).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
