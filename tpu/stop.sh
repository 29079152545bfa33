#!/usr/bin/env bash
# Sends SIGTERM to training on every worker: each saves a checkpoint and exits cleanly, as on
# a preemption notice.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

on_all_workers "pkill -TERM -f experiments.train_sharded || true"
