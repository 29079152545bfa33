#!/usr/bin/env bash
# Creates the TPU VM / pod slice and (WAIT=1, the default) waits until it is ready. Idempotent: an
# existing queued resource or VM that is usable or on its way (ACTIVE, ACCEPTED, WAITING_FOR_RESOURCES,
# PROVISIONING, CREATING, READY) is waited for, not created again; a FAILED or SUSPENDED one is reported
# (tpu/teardown.sh deletes it). QUEUE_VALID_FOR (e.g. 12h) makes the queued request expire unserved.
#
# QUEUED=1 (default): a queued resource, which waits in Google's queue for capacity; with SPOT=1
# it is Spot capacity, Google's documented way to run preemptible TPUs. QUEUED=0: a plain
# `tpu-vm create`, retried while the zone has no capacity (CREATE_RETRIES times, every
# CREATE_RETRY_SECONDS); other errors (quota, permissions, flags) fail at once.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
if [[ "${PREFLIGHT:-1}" == "1" ]]; then bash "$(dirname "$0")/preflight.sh" "$@" >&2; fi
: "${WAIT:=1}"
: "${WAIT_POLL_SECONDS:=30}"
: "${CREATE_RETRIES:=60}"
: "${CREATE_RETRY_SECONDS:=60}"

spot=()
if [[ "$SPOT" == "1" ]]; then spot=(--spot); fi
valid=()
if [[ -n "$QUEUE_VALID_FOR" ]]; then valid=(--valid-until-duration="$QUEUE_VALID_FOR"); fi

create_queued() {
  local state="NOT_FOUND"
  if [[ "$DRY_RUN" != "1" ]]; then state="$(qr_state)"; fi
  case "$state" in
    NOT_FOUND)
      run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
        --project="$PROJECT" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
        "${spot[@]}" "${valid[@]}" ;;
    ERROR) echo "cannot tell whether $QR_NAME exists (gcloud failed, above): not creating" >&2; return 1 ;;
    FAILED | SUSPENDED)
      echo "queued resource $QR_NAME exists and is $state: delete it first (tpu/teardown.sh)" >&2
      return 1 ;;
    DELETING) echo "queued resource $QR_NAME is being deleted: create it again once it is gone" >&2; return 1 ;;
    *) echo "queued resource $QR_NAME already exists ($state): not creating it again" ;;
  esac
  if [[ "$DRY_RUN" == "1" || "$WAIT" != "1" ]]; then return 0; fi
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) echo "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|NOT_FOUND)
        echo "queued resource $QR_NAME is $state: see 'gcloud compute tpus queued-resources describe" \
          "$QR_NAME --zone=$ZONE'; delete it with tpu/teardown.sh" >&2
        return 1 ;;
      *) echo "queued resource $QR_NAME: $state; waiting" ;;  # ACCEPTED, WAITING_FOR_RESOURCES, ..., ERROR
    esac
    sleep "$WAIT_POLL_SECONDS"
  done
}

create_direct() {
  local attempt err state="NOT_FOUND"
  if [[ "$DRY_RUN" != "1" ]]; then state="$(node_state)"; fi
  case "$state" in
    NOT_FOUND) ;;
    READY | CREATING | STARTING | RESTARTING)
      echo "TPU VM $TPU_NAME already exists ($state): not creating it again"
      return 0 ;;
    ERROR) echo "cannot tell whether $TPU_NAME exists (gcloud failed, above): not creating" >&2; return 1 ;;
    *) echo "TPU VM $TPU_NAME exists and is $state: delete it first (tpu/teardown.sh)" >&2; return 1 ;;
  esac
  err="$(mktemp)"
  for ((attempt = 1; attempt <= CREATE_RETRIES; attempt++)); do
    if run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
         --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}" 2>"$err"; then
      rm -f "$err"
      return 0
    fi
    cat "$err" >&2
    if ! grep -Eqi "capacity|RESOURCE_EXHAUSTED|STOCKOUT" "$err"; then
      rm -f "$err"
      return 1
    fi
    echo "no capacity in $ZONE (try $attempt/$CREATE_RETRIES); retrying in $CREATE_RETRY_SECONDS s" >&2
    sleep "$CREATE_RETRY_SECONDS"
  done
  rm -f "$err"
  echo "still no capacity after $CREATE_RETRIES tries: try another zone, or QUEUED=1" >&2
  return 1
}

if [[ "$QUEUED" == "1" ]]; then create_queued; else create_direct; fi
