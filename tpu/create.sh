#!/usr/bin/env bash
# Creates the TPU VM / pod slice.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

spot=()
if [[ "$SPOT" == "1" ]]; then spot=(--spot); fi
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
