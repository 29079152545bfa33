#!/usr/bin/env bash
# Prints the slice's state and each worker's training status (tpu/worker.sh status:
# NOT_INSTALLED, IDLE, RUNNING or EXITED <status>; 0 = finished, 143 = stopped at a checkpoint).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
require_ssh_agent

if [[ "$DRY_RUN" != "1" ]]; then
  if [[ "$QUEUED" == "1" ]]; then echo "queued resource $QR_NAME: $(qr_state)"; fi
  echo "TPU VM $TPU_NAME: $(node_state)"
fi
on_workers "${WORKER:-all}" "$(worker_sh) status"
