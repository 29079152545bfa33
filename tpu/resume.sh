#!/usr/bin/env bash
# Babysits a (Spot) slice until training finishes, then deletes it (KEEP_SLICE=1 keeps it). Every
# POLL_SECONDS it reads the slice's state and acts:
#   READY                      worker 0's training status: RUNNING: wait, unless its log has not grown
#                              for WATCHDOG_MINUTES (hung): stop (SIGKILL if need be) and relaunch;
#                              NOT_INSTALLED: setup + launch; IDLE or EXITED 143 (stopped at a
#                              checkpoint): launch; EXITED 0: done; other exits: relaunch, at most
#                              MAX_FAILURES times, then give up
#   PREEMPTED, TERMINATED, STOPPED, queued resource SUSPENDED or FAILED: delete and recreate
#   NOT_FOUND                  create
#   queued, being provisioned, being deleted: wait
#   CREATING, REPAIRING, UNKNOWN, ...: wait, recreate after STUCK_SECONDS in the same state
#   ERROR (gcloud failed: network, auth, API)   touch nothing; try again at the next poll
# After MAX_RUN_HOURS it checkpoints training (tpu/stop.sh) and stops. Whenever it stops (done,
# given up, out of time) every worker's log is copied to $WORKDIR/logs/ and the slice is deleted
# unless KEEP_SLICE=1; exit status 0 done, 1 given up, 3 out of time. Training resumes from the last
# checkpoint in $WORKDIR. Run it where it can stay up (tmux, a small VM); stop it before tpu/stop.sh
# or tpu/teardown.sh.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
here="$(dirname "$0")"
: "${POLL_SECONDS:=300}"
: "${STUCK_SECONDS:=3600}"
: "${MAX_FAILURES:=3}"
: "${UNREACHABLE_LIMIT:=12}"
: "${MAX_RUN_SECONDS:=$((MAX_RUN_HOURS * 3600))}"
: "${WATCHDOG_SECONDS:=$((WATCHDOG_MINUTES * 60))}"
: "${HUNG_STOP_TIMEOUT:=120}"

if [[ "$DRY_RUN" == "1" ]]; then
  # One recreation, printed.
  bash "$here/teardown.sh" --dry-run
  bash "$here/create.sh" --dry-run
  bash "$here/setup.sh" --dry-run
  bash "$here/launch.sh" --dry-run
  exit 0
fi
require_ssh_agent
if [[ "${PREFLIGHT:-1}" == "1" ]]; then bash "$here/preflight.sh" "$@"; fi
export PREFLIGHT=0  # checked once; the scripts run below skip it

log() {
  echo "$(date -u +%FT%TZ) resume.sh: $*"
}

# READY, PREEMPTED, ... (the TPU VM's state), NOT_FOUND, ERROR, or QR_<state> for a queued resource
# that has no usable TPU VM (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDED, FAILED, ...).
slice_state() {
  if [[ "$QUEUED" != "1" ]]; then
    node_state
    return
  fi
  local qr
  qr="$(qr_state)"
  case "$qr" in
    ACTIVE) node_state ;;
    NOT_FOUND | ERROR) echo "$qr" ;;
    *) echo "QR_$qr" ;;
  esac
}

# Worker 0's tpu/worker.sh status (RUNNING with its log's age in seconds), NOT_INSTALLED on a fresh VM,
# or UNREACHABLE when ssh fails.
training_status() {
  local remote out
  remote="if [ -f ~/$(q "$REPO_DIR")/tpu/worker.sh ]; then $(worker_sh) status --age; else echo NOT_INSTALLED; fi"
  if out="$(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
              --command="$remote" 2>/dev/null)" && [[ -n "$out" ]]; then
    tail -n 1 <<<"$out"
  else
    echo "UNREACHABLE"
  fi
}

recreate() {
  log "recreating the slice: $1"
  bash "$here/teardown.sh" || log "delete failed (already gone?)"
  WAIT=0 bash "$here/create.sh" || log "create failed; trying again at the next poll"
}

setup_and_launch() {
  if [[ "$1" == "setup" ]]; then
    bash "$here/setup.sh" || { log "setup failed; trying again at the next poll"; return; }
  fi
  bash "$here/launch.sh" || log "launch failed; trying again at the next poll"
}

# Copies every worker's log to $WORKDIR/logs/ (best effort: a worker may be gone).
upload_logs() {
  on_workers all "$(worker_sh) upload-logs $(q "$WORKDIR")" >/dev/null 2>&1 || log "could not upload every worker's log"
}

# Stops babysitting with status $1: uploads the logs and deletes the slice unless KEEP_SLICE=1.
finish() {
  upload_logs
  if [[ "$KEEP_SLICE" == "1" ]]; then
    log "leaving the slice up (KEEP_SLICE=1): delete it with tpu/teardown.sh"
  else
    log "deleting the slice (KEEP_SLICE=1 keeps it); logs and checkpoints stay in $WORKDIR"
    bash "$here/teardown.sh" || log "delete failed: run tpu/teardown.sh"
  fi
  exit "$1"
}

# Training that has logged nothing for WATCHDOG_SECONDS is hung (a dead peer, a stuck collective):
# stop it everywhere (SIGTERM, then SIGKILL) and launch again from the last checkpoint.
restart_hung() {
  log "no log line for $1 s (WATCHDOG_MINUTES=$WATCHDOG_MINUTES): stopping and relaunching training"
  on_workers all "STOP_TIMEOUT=$(q "$HUNG_STOP_TIMEOUT") $(worker_sh) stop --force" || log "stop failed on a worker"
  setup_and_launch launch
}

failures=0
unreachable=0
tend_training() {
  local status
  status="$(training_status)"
  if [[ "$status" != "UNREACHABLE" ]]; then unreachable=0; fi
  case "$status" in
    RUNNING*)
      local age="${status#RUNNING}"
      age="${age// /}"
      if [[ -n "$age" ]] && ((age >= WATCHDOG_SECONDS)); then restart_hung "$age"; fi ;;
    "EXITED 0") log "training finished (logs: $WORKDIR/logs/)"; finish 0 ;;
    NOT_INSTALLED) log "fresh slice: setting up and launching"; setup_and_launch setup ;;
    IDLE) log "launching"; setup_and_launch launch ;;
    "EXITED 143") log "training stopped at a checkpoint (preemption notice); relaunching"; setup_and_launch launch ;;
    EXITED*)
      failures=$((failures + 1))
      if ((failures > MAX_FAILURES)); then
        log "training failed $failures times ($status); giving up: see $WORKDIR/logs/"
        finish 1
      fi
      log "training failed ($status, failure $failures of $MAX_FAILURES allowed); relaunching"
      setup_and_launch launch ;;
    *)
      unreachable=$((unreachable + 1))
      log "worker 0 unreachable over ssh ($unreachable/$UNREACHABLE_LIMIT)"
      if ((unreachable >= UNREACHABLE_LIMIT)); then
        log "giving up: check 'gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE' by hand"
        finish 1
      fi ;;
  esac
}

last=""
since=$SECONDS
started=$SECONDS
while true; do
  if ((SECONDS - started >= MAX_RUN_SECONDS)); then
    log "out of time (MAX_RUN_HOURS=$MAX_RUN_HOURS): checkpointing and stopping training"
    on_workers all "$(worker_sh) stop" >/dev/null 2>&1 || log "stop failed (slice gone?)"
    finish 3
  fi
  state="$(slice_state)"
  if [[ "$state" != "$last" ]]; then
    log "slice $TPU_NAME: $state"
    last="$state"
    since=$SECONDS
  fi
  case "$state" in
    READY) tend_training ;;
    NOT_FOUND) log "no slice: creating it"; WAIT=0 bash "$here/create.sh" || log "create failed; trying again at the next poll" ;;
    PREEMPTED | TERMINATED | STOPPED | QR_SUSPENDED | QR_FAILED) recreate "$state" ;;
    ERROR) ;;  # gcloud could not tell (its error is above): a healthy slice must not be deleted for that
    QR_ACCEPTED | QR_WAITING_FOR_RESOURCES) ;;  # queued for capacity: waiting is what the queue is for
    *)
      if ((SECONDS - since >= STUCK_SECONDS)); then
        recreate "$state for $((SECONDS - since)) s"
        last=""
      fi ;;
  esac
  sleep "$POLL_SECONDS"
done
