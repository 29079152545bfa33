#!/usr/bin/env bash
# Deletes the slice (with QUEUED=1 its queued resource too, whose --force deletes the TPU VMs
# first). Billing stops; the checkpoints and metrics in $WORKDIR stay.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

if [[ "$QUEUED" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "$QR_NAME" --zone="$ZONE" --project="$PROJECT" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
fi
