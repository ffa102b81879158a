#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Show or stream the logs of a run started by launch.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: logs.sh --name NAME --zone ZONE [--worker W|all] [--lines N] [--no-follow] [--run-dir DIR]

Stream (tail -F) the log of worker W (default 0, which prints the metrics) of the run in RUN_DIR.
--worker all streams every worker, each line prefixed with "[worker W]".  Ctrl-C stops streaming;
the run goes on.

Options:
  --worker W|all     default 0; also a list (1,3) or range (0-2)
  --lines N          lines of history to show first (default 100)
  --no-follow        print the last N lines and return
  --run-dir DIR      default: $HOME/safejax-run
  --project PROJECT
  --internal-ip
  --dry-run          print the command instead of running it
  -h, --help         this text
USAGE
}

parse_args "name zone project worker lines no-follow run-dir internal-ip dry-run" "$@"
((${#CMD_ARGS[@]} == 0)) || die "logs.sh: unexpected arguments after --: ${CMD_ARGS[*]}"
require_name
require_zone
WORKER="${OPT_WORKER:-0}"
[[ "$WORKER" =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] || die "logs.sh: --worker must be all, N, a list N,M or a range N-M; got '$WORKER'"
LINES="${OPT_LINES:-100}"
require_positive_int --lines "$LINES"
FOLLOW=1
if ((OPT_NO_FOLLOW)); then FOLLOW=0; fi
ssh_workers "$WORKER" "$(remote_logs_line "$(default_run_dir)" "$LINES" "$FOLLOW")"
