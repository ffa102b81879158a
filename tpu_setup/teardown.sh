#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete a TPU VM / slice, or the queued resource that holds it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: teardown.sh --name NAME --zone ZONE [--queued [--qr-id ID]] [options]

Delete the slice, without prompting:
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet
or, with --queued, the queued resource and its node:
  gcloud compute tpus queued-resources delete QR_ID --zone=ZONE --force --quiet

Local disks of the workers are lost; data under a gcsfuse mount or gs:// stays in the bucket.

Options:
  --queued           the slice was created with create.sh --queued
  --qr-id ID         queued-resource ID (default: NAME)
  --if-exists        check first and do nothing when it is already gone
  --project PROJECT
  --dry-run          print the commands instead of running them
  -h, --help         this text
USAGE
}

parse_args "name zone project queued qr-id if-exists dry-run" "$@"
((${#CMD_ARGS[@]} == 0)) || die "teardown.sh: unexpected arguments after --: ${CMD_ARGS[*]}"
require_name
require_zone
if [[ -n "$OPT_QR_ID" ]] && ((!OPT_QUEUED)); then die "teardown.sh: --qr-id only applies with --queued"; fi
location_flags

if ((OPT_IF_EXISTS)); then
  describe_state_cmd
  if ((DRY_RUN)); then
    note "delete only if this finds it (a NOT_FOUND answer means there is nothing to delete):"
    run "${DESCRIBE_CMD[@]}"
  else
    state="$(query_state "${DESCRIBE_CMD[@]}")"
    if [[ "$state" == GONE ]]; then
      info "teardown.sh: $( ((OPT_QUEUED)) && echo "queued resource $(qr_id)" || echo "TPU $OPT_NAME") does not exist; nothing to delete"
      exit 0
    fi
  fi
fi

if ((OPT_QUEUED)); then
  run "$GCLOUD" compute tpus queued-resources delete "$(qr_id)" "${LOCATION[@]}" --force --quiet
else
  run "$GCLOUD" compute tpus tpu-vm delete "$OPT_NAME" "${LOCATION[@]}" --quiet
fi
