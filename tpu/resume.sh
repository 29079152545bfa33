#!/usr/bin/env bash
# Keeps a spot slice training until it finishes: when the slice is preempted (or gone), it is
# deleted, recreated, set up and relaunched; training resumes from the last checkpoint in $WORKDIR.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"
here="$(dirname "$0")"
: "${POLL_SECONDS:=300}"

state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --format='value(state)' 2>/dev/null || echo MISSING
}

if [[ "$DRY_RUN" == "1" ]]; then
  # One pass of the loop, printed.
  bash "$here/teardown.sh" --dry-run
  bash "$here/create.sh" --dry-run
  bash "$here/setup.sh" --dry-run
  bash "$here/launch.sh" --dry-run
  exit 0
fi
while true; do
  case "$(state)" in
    READY)
      if run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
           --command="grep -q 'step .*' ~/train.log && ! pgrep -f experiments.train_sharded" ; then
        echo "training process ended; check ~/train.log on worker 0"; exit 0
      fi ;;
    PREEMPTED|TERMINATED|MISSING)
      bash "$here/teardown.sh" || true
      bash "$here/create.sh" && bash "$here/setup.sh" && bash "$here/launch.sh" ;;
    *) ;;  # CREATING, STARTING, ...: wait
  esac
  sleep "$POLL_SECONDS"
done
