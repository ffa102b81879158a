#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keep a run alive on spot / preemptible capacity: poll the slice and the run, and on preemption
# rebuild the slice and start the same command again (relaunch.sh); safejax resumes from the
# latest checkpoint in out_dir.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: watch.sh --name NAME --zone ZONE --accelerator-type TYPE [relaunch.sh options] [watch options] -- COMMAND...

Every INTERVAL seconds:
  * slice state:  gcloud compute tpus tpu-vm describe NAME --format='value(state)'
                  (--queued: gcloud compute tpus queued-resources describe QR_ID --format='value(state.state)')
  * PREEMPTED / TERMINATED / SUSPENDED / FAILED / deleted  -> relaunch.sh (delete, create, install,
    copy data, launch the same COMMAND; the run resumes from its latest checkpoint)
  * READY / ACTIVE -> run state on every worker (launch.sh --status):
      all workers EXIT 0    -> done (with --teardown-on-success the slice is deleted)
      a worker EXIT n > 0   -> stop watching, exit 1 (look at logs.sh --worker all)
      a worker DEAD, NONE or EXIT 143 (stopped by SIGTERM: host restart or launch.sh --stop)
                            -> stop the others, launch the same command again (it resumes)
      all RUNNING           -> wait
  * other states (CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...) -> wait

All relaunch.sh options are accepted and passed on (see relaunch.sh --help).  Run it where it may
stay up for days (tmux/screen on a small VM, or Cloud Shell for short runs).  Stop watch.sh before
you stop a run by hand (launch.sh --stop), or it starts the run again.

Watch options:
  --interval SECONDS       between checks (default 300)
  --max-relaunches N       give up after N rebuilds (default 20)
  --teardown-on-success    delete the slice once every worker exited 0
  --once                   one check (and at most one relaunch), then exit
  --dry-run                print the check commands and the relaunch sequence, run nothing
USAGE
}

RELAUNCH_FLAGS="name zone project accelerator-type version spot preemptible queued qr-id wait-interval gcloud-arg source python venv copy from-gcs gcsfuse run-dir workdir env internal-ip dry-run"
parse_args "$RELAUNCH_FLAGS interval max-relaunches teardown-on-success once" "$@"
require_name
require_zone
require_accelerator
((${#CMD_ARGS[@]} > 0)) || die "watch.sh: missing command; put it after --, the same one launch.sh started"
INTERVAL="${OPT_INTERVAL:-300}"
MAX_RELAUNCHES="${OPT_MAX_RELAUNCHES:-20}"
require_positive_int --interval "$INTERVAL"
[[ "$MAX_RELAUNCHES" =~ ^[0-9]+$ ]] || die "watch.sh: --max-relaunches must be a non-negative integer, got '$MAX_RELAUNCHES'"

# Arguments for relaunch.sh: everything except the watch-only options.
relaunch_args=()
skip_next=0
for a in "$@"; do
  if ((skip_next)); then skip_next=0; continue; fi
  case "$a" in
    --) break ;;
    --interval | --max-relaunches) skip_next=1; continue ;;
    --interval=* | --max-relaunches=* | --teardown-on-success | --once | --dry-run) continue ;;
  esac
  relaunch_args+=("$a")
done
if ((DRY_RUN)); then relaunch_args+=(--dry-run); fi
relaunch_args+=(-- "${CMD_ARGS[@]}")

common=(--name "$OPT_NAME" --zone "$OPT_ZONE")
if [[ -n "$OPT_PROJECT" ]]; then common+=(--project "$OPT_PROJECT"); fi
if ((OPT_INTERNAL_IP)); then common+=(--internal-ip); fi
launch_opts=()
if [[ -n "$OPT_RUN_DIR" ]]; then launch_opts+=(--run-dir "$OPT_RUN_DIR"); fi
teardown_opts=(--name "$OPT_NAME" --zone "$OPT_ZONE")
if [[ -n "$OPT_PROJECT" ]]; then teardown_opts+=(--project "$OPT_PROJECT"); fi
if ((OPT_QUEUED)); then
  teardown_opts+=(--queued)
  if [[ -n "$OPT_QR_ID" ]]; then teardown_opts+=(--qr-id "$OPT_QR_ID"); fi
fi

describe_state_cmd
node_describe_cmd

if ((DRY_RUN)); then
  note "every ${INTERVAL}s: state of the slice"
  run "${DESCRIBE_CMD[@]}"
  if ((OPT_QUEUED)); then
    note "when the queued resource is ACTIVE, the node itself (it can be PREEMPTED first):"
    run "${NODE_DESCRIBE_CMD[@]}"
  fi
  note "when READY/ACTIVE: state of the run on every worker"
  bash "$HERE/launch.sh" "${common[@]}" "${launch_opts[@]}" --status --dry-run
  note "when a worker is DEAD or NONE: stop the others and launch again"
  bash "$HERE/launch.sh" "${common[@]}" "${launch_opts[@]}" --stop --dry-run
  note "when PREEMPTED, TERMINATED, SUSPENDED, FAILED or deleted (at most $MAX_RELAUNCHES times):"
  bash "$HERE/relaunch.sh" "${relaunch_args[@]}"
  if ((OPT_TEARDOWN_ON_SUCCESS)); then
    note "when every worker exited 0:"
    bash "$HERE/teardown.sh" "${teardown_opts[@]}" --dry-run
  fi
  exit 0
fi

slice_state() {
  local s
  s="$(query_state "${DESCRIBE_CMD[@]}")"
  if ((OPT_QUEUED)) && [[ "$s" == ACTIVE ]]; then
    local n
    n="$(query_state "${NODE_DESCRIBE_CMD[@]}")"
    case "$n" in PREEMPTED | TERMINATED | GONE) s="$n" ;; esac
  fi
  printf '%s' "$s"
}

relaunches=0
while :; do
  state="$(slice_state)"
  stamp="$(date '+%F %T')"
  case "$state" in
    READY | ACTIVE)
      statuses="$(bash "$HERE/launch.sh" "${common[@]}" "${launch_opts[@]}" --status 2>/dev/null || true)"
      verdict="$(run_verdict "$ACCEL_HOSTS" "$statuses")"
      case "$verdict" in
        unknown)
          info "[$stamp] watch.sh: $state; could not read the run state of all $ACCEL_HOSTS workers (ssh trouble?); checking again later" ;;
        done)
          info "[$stamp] watch.sh: every worker exited 0; the run is complete"
          if ((OPT_TEARDOWN_ON_SUCCESS)); then
            bash "$HERE/teardown.sh" "${teardown_opts[@]}"
          fi
          exit 0 ;;
        failed)
          info "[$stamp] watch.sh: the run failed:"
          info "$(grep '^safejax-status ' <<<"$statuses" || true)"
          info "see: $(render_cmd bash "$HERE/logs.sh" "${common[@]}" "${launch_opts[@]}" --worker all --no-follow)"
          exit 1 ;;
        restart)
          info "[$stamp] watch.sh: the run is gone or was stopped on some workers (host restart?); restarting it on all"
          bash "$HERE/launch.sh" "${common[@]}" "${launch_opts[@]}" --stop || true
          launch_args=("${common[@]}" "${launch_opts[@]}")
          if [[ -n "$OPT_WORKDIR" ]]; then launch_args+=(--workdir "$OPT_WORKDIR"); fi
          if [[ -n "$OPT_VENV" ]]; then launch_args+=(--venv "$OPT_VENV"); fi
          # shellcheck disable=SC2153  # OPT_ENVS is filled by parse_args
          for kv in "${OPT_ENVS[@]}"; do launch_args+=(--env "$kv"); done
          bash "$HERE/launch.sh" "${launch_args[@]}" -- "${CMD_ARGS[@]}" || info "watch.sh: launch failed; retrying at the next check" ;;
        running)
          info "[$stamp] watch.sh: $state; the run is alive on all $ACCEL_HOSTS workers" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | SUSPENDED | SUSPENDING | FAILED | GONE)
      if ((relaunches >= MAX_RELAUNCHES)); then
        die "watch.sh: slice is $state and --max-relaunches $MAX_RELAUNCHES is used up"
      fi
      relaunches=$((relaunches + 1))
      info "[$stamp] watch.sh: slice is $state; relaunch $relaunches/$MAX_RELAUNCHES"
      bash "$HERE/relaunch.sh" "${relaunch_args[@]}" || info "watch.sh: relaunch failed; trying again at the next check"
      ;;
    "")
      info "[$stamp] watch.sh: could not read the slice state; checking again later" ;;
    *)
      info "[$stamp] watch.sh: slice is $state; waiting" ;;
  esac
  if ((OPT_ONCE)); then exit 0; fi
  sleep "$INTERVAL"
done
