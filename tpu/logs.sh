#!/usr/bin/env bash
# Follows the training log of one worker (WORKER=0 by default: the process that prints metrics).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

on_workers "${WORKER:-0}" "$(worker_sh) logs"
