#!/usr/bin/env bash
# Checks what would otherwise fail only after a slice was created or the model loaded: a zone is given
# (common.sh), the runtime version suits the accelerator type, $WORKDIR is a bucket this account can write
# (a test object is written and deleted), $DATA exists, MODEL_SRC is gs:// or hf://. The training entry
# point checks the rest before it loads the model (global batch divisible by the data-parallel size, the
# memory per chip). create.sh, launch.sh and resume.sh run it first; PREFLIGHT=0 skips it.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh" "$@"

fail() {
  echo "preflight: $*" >&2
  exit 2
}

want="$(runtime_for "$ACCELERATOR_TYPE")"
if [[ -z "$want" ]]; then
  fail "unknown ACCELERATOR_TYPE=$ACCELERATOR_TYPE: use v4-N, v5litepod-N, v5p-N or v6e-N."
fi
if [[ "$RUNTIME_VERSION" != "$want" && "$RUNTIME_VERSION" != "tpu-vm-v4-base" ]]; then
  fail "RUNTIME_VERSION=$RUNTIME_VERSION does not run on $ACCELERATOR_TYPE: use $want (or leave RUNTIME_VERSION unset)."
fi
if [[ "$WORKDIR" != gs://* ]]; then
  fail "WORKDIR=$WORKDIR must be a bucket path (gs://BUCKET/PATH) that every worker shares."
fi
if [[ -n "$MODEL_SRC" && "$MODEL_SRC" != gs://* && "$MODEL_SRC" != hf://* ]]; then
  fail "MODEL_SRC=$MODEL_SRC must be gs://BUCKET/PATH or hf://ORG/NAME."
fi
if [[ "$DRY_RUN" == "1" ]]; then
  exit 0
fi
probe="${WORKDIR%/}/.preflight-$(date +%s)-$$"
local_file="$(mktemp)"
echo "mos_jax preflight" >"$local_file"
if ! gcloud storage cp "$local_file" "$probe" --project="$PROJECT" >/dev/null 2>&1; then
  rm -f "$local_file"
  fail "cannot write to $WORKDIR: create the bucket in the slice's region and grant the TPU VMs' service" \
    "account (and you) roles/storage.objectAdmin on it."
fi
rm -f "$local_file"
gcloud storage rm "$probe" --project="$PROJECT" >/dev/null 2>&1 || fail "wrote $probe but cannot delete it: grant roles/storage.objectAdmin."
if [[ -n "$DATA" && "$DATA" == gs://* ]] && ! gcloud storage ls "$DATA" --project="$PROJECT" >/dev/null 2>&1; then
  fail "DATA=$DATA is not readable (missing, or no read access)."
fi
echo "preflight: $ACCELERATOR_TYPE in $ZONE with $RUNTIME_VERSION; $WORKDIR is writable"
