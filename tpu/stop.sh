#!/usr/bin/env bash
# A preemption notice on demand: SIGTERM to the training process of every worker. They agree on
# one step, checkpoint it to $WORKDIR and exit (status 143); each worker waits for its process.
# Stop tpu/resume.sh first if it runs: it would relaunch.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
require_ssh_agent

on_workers all "$(worker_sh) stop"
