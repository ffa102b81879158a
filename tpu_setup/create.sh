#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a Cloud TPU VM or multi-host slice, directly or through a queued resource (spot capacity).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM / slice:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME [--spot|--preemptible]
or, with --queued, a queued resource holding one node NAME:
  gcloud compute tpus queued-resources create QR_ID --node-id=NAME --zone=ZONE --accelerator-type=TYPE --runtime-version=RUNTIME [--spot]

Required:
  --name NAME               TPU (node) name: lowercase letters, digits, hyphens
  --zone ZONE               e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e)
  --accelerator-type TYPE   v4-N, v5p-N, v5litepod-N (alias v5e-N) or v6e-N, e.g. v4-32, v5p-16, v5e-16

Options:
  --version RUNTIME         TPU software version; default per generation:
                            v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
  --project PROJECT         GCP project (default: gcloud's configured project)
  --spot                    Spot capacity (cheaper, can be preempted at any time; see watch.sh)
  --preemptible             legacy preemptible TPU (direct create only; queued resources take --spot)
  --queued                  request through a queued resource (waits in the queue for capacity)
  --qr-id ID                queued-resource ID (default: NAME)
  --wait                    after a queued request, poll until it is ACTIVE (every --wait-interval s, default 60)
  --wait-interval SECONDS
  --gcloud-arg ARG          extra argument for the create command, repeatable
                            (e.g. --gcloud-arg=--service-account=SA@PROJECT.iam.gserviceaccount.com)
  --dry-run                 print the commands instead of running them
  -h, --help                this text
USAGE
}

parse_args "name zone project accelerator-type version spot preemptible queued qr-id wait wait-interval gcloud-arg dry-run" "$@"
((${#CMD_ARGS[@]} == 0)) || die "create.sh: unexpected arguments after --: ${CMD_ARGS[*]} (use --gcloud-arg)"
require_name
require_zone
require_accelerator
if ((OPT_SPOT && OPT_PREEMPTIBLE)); then
  die "create.sh: choose one of --spot and --preemptible"
fi
if ((OPT_QUEUED && OPT_PREEMPTIBLE)); then
  die "create.sh: queued resources request preemptible capacity as --spot; use --queued --spot"
fi
if [[ -n "$OPT_QR_ID" ]] && ((!OPT_QUEUED)); then
  die "create.sh: --qr-id only applies with --queued"
fi
WAIT_INTERVAL="${OPT_WAIT_INTERVAL:-60}"
require_positive_int --wait-interval "$WAIT_INTERVAL"
RUNTIME="${OPT_VERSION:-$ACCEL_RUNTIME}"

location_flags
info "create.sh: $ACCEL_TYPE = $ACCEL_HOSTS host(s) x $ACCEL_CHIPS_PER_HOST chip(s) = $ACCEL_CHIPS chips, runtime $RUNTIME"
if ((OPT_QUEUED)); then
  cmd=("$GCLOUD" compute tpus queued-resources create "$(qr_id)" --node-id="$OPT_NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCEL_TYPE" --runtime-version="$RUNTIME")
  if ((OPT_SPOT)); then cmd+=(--spot); fi
else
  cmd=("$GCLOUD" compute tpus tpu-vm create "$OPT_NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCEL_TYPE" --version="$RUNTIME")
  if ((OPT_SPOT)); then cmd+=(--spot); fi
  if ((OPT_PREEMPTIBLE)); then cmd+=(--preemptible); fi
fi
cmd+=("${OPT_GCLOUD_ARGS[@]}")
run "${cmd[@]}"

if ((OPT_QUEUED && OPT_WAIT)); then
  describe_state_cmd
  if ((DRY_RUN)); then
    note "repeated every ${WAIT_INTERVAL}s until the state is ACTIVE (FAILED or SUSPENDED stops with an error):"
    run "${DESCRIBE_CMD[@]}"
    exit 0
  fi
  while :; do
    state="$(query_state "${DESCRIBE_CMD[@]}")"
    case "$state" in
      ACTIVE) info "create.sh: queued resource $(qr_id) is ACTIVE; node $OPT_NAME is ready"; break ;;
      FAILED | SUSPENDED | SUSPENDING | GONE)
        printf 'error: create.sh: queued resource %s is %s; see: gcloud compute tpus queued-resources describe %s %s\n' \
          "$(qr_id)" "$state" "$(qr_id)" "$(render_cmd "${LOCATION[@]}")" >&2
        exit 1 ;;
      *) info "create.sh: queued resource $(qr_id): ${state:-unknown}; next check in ${WAIT_INTERVAL}s" ;;
    esac
    sleep "$WAIT_INTERVAL"
  done
fi
