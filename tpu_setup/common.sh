# shellcheck shell=bash disable=SC2034,SC2016
# (SC2034: the variables set here are read by the scripts that source this file;
#  SC2016: single-quoted $VARs in remote lines are expanded by the worker's shell.)
# Shared helpers for the tpu_setup/ scripts.  Sourced, never executed.
#
# Conventions
#   * Every script takes --dry-run: each command that would run is printed on stdout, one per line,
#     prefixed "+ ", quoted so that the line can be pasted into bash.  Comment lines ("# ...") say
#     what would be repeated or decided at run time.  A dry run never calls gcloud or ssh.
#   * In a real run the same "+ ..." line goes to stderr just before the command runs.
#   * Errors: "error: <message>" on stderr and exit status 2 for bad input; gcloud's own status
#     is passed through for failed commands.
#   * Remote paths may use $HOME (quote it on your command line: '$HOME/data'); it is expanded
#     on the TPU worker, not on your machine.  A relative remote path is relative to $HOME.

if [[ -z "${BASH_VERSINFO:-}" ]] || ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: tpu_setup needs bash >= 4.4 (found ${BASH_VERSION:-none}); on macOS: brew install bash" >&2
  exit 2
fi

# ----------------------------------------------------------------------------- messages

SCRIPT_NAME="${0##*/}"
GCLOUD="${GCLOUD:-gcloud}"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

info() {
  printf '%s\n' "$*" >&2
}

# ----------------------------------------------------------------------------- quoting

# Quote one word so that bash reads it back unchanged.  Plain words stay bare; "--flag=value"
# words keep the "--flag=" bare and quote only the value (e.g. --format='value(state)').
shquote() {
  local s="$1"
  local safe='^[A-Za-z0-9_./:=,@%+-]+$'
  if [[ -n "$s" && "$s" =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ "$s" == *[[:cntrl:]]* ]]; then
    printf '%q' "$s" # $'...' keeps newlines and tabs on one printed line
  elif [[ "$s" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    _squote "${BASH_REMATCH[2]}"
  else
    _squote "$s"
  fi
}

_squote() {
  local s="$1" q="'\\''"
  printf "'%s'" "${s//\'/$q}"
}

# All arguments as one shell line.
render_cmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(shquote "$w")"
  done
  printf '%s' "$out"
}

# Double-quote a word for the *remote* shell: $VAR still expands there, nothing else does.
dq() {
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//\`/\\\`}"
  printf '"%s"' "$s"
}

# ----------------------------------------------------------------------------- running

DRY_RUN=0

# run CMD ARGS...: print "+ CMD ARGS" (stdout in a dry run, stderr otherwise) and run it unless dry.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(render_cmd "$@")"
  else
    printf '+ %s\n' "$(render_cmd "$@")" >&2
    "$@"
  fi
}

# note TEXT: a comment line in the dry-run transcript (stderr in a real run).
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '# %s\n' "$*" >&2
  fi
}

# ----------------------------------------------------------------------------- accelerators

# accelerator_info TYPE: validate TYPE and set
#   ACCEL_TYPE (canonical gcloud name), ACCEL_GEN (v4|v5p|v5e|v6e), ACCEL_CORES, ACCEL_CHIPS,
#   ACCEL_HOSTS (TPU VM workers), ACCEL_CHIPS_PER_HOST, ACCEL_HBM_GIB (per chip), ACCEL_RUNTIME.
#
# v4 and v5p names count TensorCores (2 per chip, megacore: JAX sees one device per chip) and put
#   4 chips on each host: v4-32 = 16 chips = 4 hosts, v5p-16 = 8 chips = 2 hosts.
# v5e (v5litepod-N) and v6e (v6e-N) names count chips (1 TensorCore each).  Slices of up to 8
#   chips are one VM (1, 4 or 8 chips); larger slices are built from 4-chip VMs
#   (v5e: ct5lp-hightpu-4t), so v5litepod-16 = 16 chips = 4 hosts.  (Google's v5e table lists
#   "2 hosts" for 4x4 because it counts 8-chip physical machines; --worker=all addresses the
#   4 VMs, and jax.process_count() is 4.)
accelerator_info() {
  local raw="${1:-}" t gen n
  [[ -n "$raw" ]] || die "missing accelerator type (e.g. v4-32, v5p-16, v5litepod-16 or v5e-16)"
  t="${raw,,}"
  if [[ "$t" =~ ^v5e-([0-9]+)$ ]]; then
    t="v5litepod-${BASH_REMATCH[1]}"
  fi
  if [[ ! "$t" =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]]; then
    die "unknown accelerator type '$raw': expected v4-N, v5p-N, v5litepod-N (alias v5e-N) or v6e-N, e.g. v4-32, v5p-16, v5e-16"
  fi
  gen="${BASH_REMATCH[1]}"
  n=$((10#${BASH_REMATCH[2]}))
  case "$gen" in
    v4 | v5p)
      if ((n < 8 || n % 8 != 0)); then
        die "accelerator type '$raw': $gen sizes count TensorCores (2 per chip, 4 chips per host) and must be a multiple of 8, e.g. $gen-8, $gen-16, $gen-32"
      fi
      ACCEL_CORES=$n
      ACCEL_CHIPS=$((n / 2))
      ACCEL_CHIPS_PER_HOST=4
      if [[ "$gen" == v4 ]]; then
        ACCEL_GEN=v4 ACCEL_HBM_GIB=32 ACCEL_RUNTIME=tpu-ubuntu2204-base
      else
        ACCEL_GEN=v5p ACCEL_HBM_GIB=95 ACCEL_RUNTIME=v2-alpha-tpuv5
      fi
      ;;
    v5litepod | v6e)
      case "$n" in
        1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
        *) die "accelerator type '$raw': $gen sizes count chips and must be one of 1, 4, 8, 16, 32, 64, 128, 256" ;;
      esac
      ACCEL_CORES=$n
      ACCEL_CHIPS=$n
      if ((n <= 8)); then ACCEL_CHIPS_PER_HOST=$n; else ACCEL_CHIPS_PER_HOST=4; fi
      if [[ "$gen" == v5litepod ]]; then
        ACCEL_GEN=v5e ACCEL_HBM_GIB=16 ACCEL_RUNTIME=v2-alpha-tpuv5-lite
      else
        ACCEL_GEN=v6e ACCEL_HBM_GIB=32 ACCEL_RUNTIME=v2-alpha-tpuv6e
      fi
      ;;
  esac
  ACCEL_TYPE="$gen-$n"
  ACCEL_HOSTS=$((ACCEL_CHIPS / ACCEL_CHIPS_PER_HOST))
}

# ----------------------------------------------------------------------------- argument parsing

# Flags that take no value, and flags that may be repeated (collected into OPT_<NAME>S arrays).
BOOL_FLAGS=" dry-run spot preemptible queued wait follow internal-ip if-exists stop status no-follow once teardown-on-success "
LIST_FLAGS=" env copy from-gcs gcsfuse gcloud-arg "
# Flags whose value may itself start with "--".
DASH_VALUE_FLAGS=" gcloud-arg "

# parse_args "ALLOWED FLAGS" "$@": fill OPT_* variables (--accelerator-type -> OPT_ACCELERATOR_TYPE,
# --env -> OPT_ENVS array), words after "--" go to CMD_ARGS.  Unknown flags are errors.
parse_args() {
  local allowed=" $1 help "
  shift
  CMD_ARGS=()
  while (($#)); do
    local arg="$1" flag val has_val=0 key var
    case "$arg" in
      --)
        shift
        CMD_ARGS=("$@")
        break
        ;;
      -h) flag=--help ;;
      --*=*)
        flag="${arg%%=*}"
        val="${arg#*=}"
        has_val=1
        ;;
      --*) flag="$arg" ;;
      *) die "$SCRIPT_NAME: unexpected argument '$arg' (options start with --; see --help)" ;;
    esac
    key="${flag#--}"
    if [[ "$allowed" != *" $key "* ]]; then
      die "$SCRIPT_NAME: unknown option '$flag' (see --help)"
    fi
    if [[ "$key" == help ]]; then
      usage
      exit 0
    fi
    var="OPT_${key//-/_}"
    var="${var^^}"
    if [[ "$BOOL_FLAGS" == *" $key "* ]]; then
      ((has_val == 0)) || die "$SCRIPT_NAME: option $flag takes no value"
      printf -v "$var" '%s' 1
      shift
      continue
    fi
    if ((has_val == 0)); then
      if (($# < 2)); then
        die "$SCRIPT_NAME: option $flag needs a value"
      fi
      val="$2"
      if [[ "$val" == --* && "$DASH_VALUE_FLAGS" != *" $key "* ]]; then
        die "$SCRIPT_NAME: option $flag needs a value (got '$val')"
      fi
      shift
    fi
    if [[ "$LIST_FLAGS" == *" $key "* ]]; then
      local -n _list="${var}S"
      _list+=("$val")
      unset -n _list
    else
      printf -v "$var" '%s' "$val"
    fi
    shift
  done
  DRY_RUN="${OPT_DRY_RUN:-0}"
}

# Defaults for every OPT_* a script may read (so `set -u` never trips on an unset flag).
init_opts() {
  OPT_NAME="" OPT_ZONE="" OPT_PROJECT="" OPT_ACCELERATOR_TYPE="" OPT_VERSION="" OPT_QR_ID=""
  OPT_SOURCE="" OPT_PYTHON="" OPT_VENV="" OPT_RUN_DIR="" OPT_WORKDIR="" OPT_WORKER="" OPT_LINES=""
  OPT_INTERVAL="" OPT_MAX_RELAUNCHES="" OPT_WAIT_INTERVAL=""
  OPT_DRY_RUN=0 OPT_SPOT=0 OPT_PREEMPTIBLE=0 OPT_QUEUED=0 OPT_WAIT=0 OPT_FOLLOW=0 OPT_INTERNAL_IP=0
  OPT_IF_EXISTS=0 OPT_STOP=0 OPT_STATUS=0 OPT_NO_FOLLOW=0 OPT_ONCE=0 OPT_TEARDOWN_ON_SUCCESS=0
  OPT_ENVS=() OPT_COPYS=() OPT_FROM_GCSS=() OPT_GCSFUSES=() OPT_GCLOUD_ARGS=()
}
init_opts

# A TPU / queued-resource ID: lowercase letters, digits and hyphens, starting with a letter.
require_name() {
  [[ -n "$OPT_NAME" ]] || die "$SCRIPT_NAME: missing --name (the TPU VM / slice name, e.g. --name safejax-v4-32)"
  if [[ ! "$OPT_NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]]; then
    die "$SCRIPT_NAME: --name '$OPT_NAME' is not a valid TPU name (lowercase letters, digits and hyphens, starting with a letter, at most 63 characters)"
  fi
  if [[ -n "$OPT_QR_ID" && ! "$OPT_QR_ID" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]]; then
    die "$SCRIPT_NAME: --qr-id '$OPT_QR_ID' is not a valid queued-resource ID (lowercase letters, digits and hyphens)"
  fi
}

require_zone() {
  [[ -n "$OPT_ZONE" ]] || die "$SCRIPT_NAME: missing --zone (e.g. --zone us-central2-b for v4, us-east5-a for v5p, us-west4-a for v5e)"
}

require_accelerator() {
  [[ -n "$OPT_ACCELERATOR_TYPE" ]] || die "$SCRIPT_NAME: missing --accelerator-type (e.g. v4-32, v5p-16, v5litepod-16 or v5e-16)"
  accelerator_info "$OPT_ACCELERATOR_TYPE"
}

require_positive_int() { # NAME VALUE
  if [[ ! "$2" =~ ^[0-9]+$ ]] || ((10#$2 == 0)); then
    die "$SCRIPT_NAME: $1 must be a positive integer, got '$2'"
  fi
}

qr_id() {
  printf '%s' "${OPT_QR_ID:-$OPT_NAME}"
}

# ----------------------------------------------------------------------------- gcloud command pieces

# --zone / --project words shared by every gcloud call.
location_flags() {
  LOCATION=(--zone="$OPT_ZONE")
  if [[ -n "$OPT_PROJECT" ]]; then
    LOCATION+=(--project="$OPT_PROJECT")
  fi
}

# ssh_all WORKER REMOTE_COMMAND: run one shell line on the chosen workers ("all" = every host at once).
ssh_workers() {
  local worker="$1" remote="$2"
  location_flags
  local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$OPT_NAME" "${LOCATION[@]}" --worker="$worker")
  if ((OPT_INTERNAL_IP)); then cmd+=(--internal-ip); fi
  cmd+=(--command="$remote")
  run "${cmd[@]}"
}

# Print the state of the TPU VM (READY, CREATING, PREEMPTED, ...) or of the queued resource
# (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...); "GONE" when it does not exist; "" on other errors.
describe_state_cmd() {
  location_flags
  if ((OPT_QUEUED)); then
    DESCRIBE_CMD=("$GCLOUD" compute tpus queued-resources describe "$(qr_id)" "${LOCATION[@]}" --format='value(state.state)')
  else
    DESCRIBE_CMD=("$GCLOUD" compute tpus tpu-vm describe "$OPT_NAME" "${LOCATION[@]}" --format='value(state)')
  fi
}

node_describe_cmd() {
  location_flags
  NODE_DESCRIBE_CMD=("$GCLOUD" compute tpus tpu-vm describe "$OPT_NAME" "${LOCATION[@]}" --format='value(state)')
}

query_state() { # CMD...: run a describe command and classify its result
  local out err rc=0 errfile
  printf '+ %s\n' "$(render_cmd "$@")" >&2
  errfile="$(mktemp)"
  out="$("$@" 2>"$errfile")" || rc=$?
  err="$(<"$errfile")"
  rm -f "$errfile"
  if ((rc == 0)); then
    printf '%s' "${out//[[:space:]]/}"
  elif [[ "$err" == *NOT_FOUND* || "$err" == *"not found"* || "$err" == *"was not found"* ]]; then
    printf 'GONE'
  else
    info "$SCRIPT_NAME: describe failed (exit $rc): ${err:0:300}"
    printf ''
  fi
}

# ----------------------------------------------------------------------------- remote paths

# Remote path for use inside a remote shell line: ~ and relative paths become $HOME/..., then dq.
remote_path() {
  local p="$1"
  # shellcheck disable=SC2088  # a literal "~" typed by the user, not expanded here
  case "$p" in
    "~") p='$HOME' ;;
    "~/"*) p='$HOME/'"${p#\~/}" ;;
    /* | \$*) ;;
    *) p='$HOME/'"$p" ;;
  esac
  dq "$p"
}

# Remote path for scp (no shell on the far side with the SFTP protocol): $HOME/x and ~/x -> x.
scp_path() {
  local p="$1"
  # shellcheck disable=SC2088
  case "$p" in
    "~" | '$HOME' | '${HOME}') p="." ;;
    "~/"*) p="${p#\~/}" ;;
    '$HOME/'*) p="${p#\$HOME/}" ;;
    '${HOME}/'*) p="${p#\$\{HOME\}/}" ;;
  esac
  [[ "$p" != *'$'* ]] || die "$SCRIPT_NAME: remote path '$1' uses a variable other than \$HOME, which scp cannot expand"
  printf '%s' "$p"
}

# ----------------------------------------------------------------------------- remote run control
# The shell lines below run on every worker (gcloud ... ssh --worker=all --command=LINE).  Each
# worker finds its index W from the metadata server and keeps, in the run directory,
#   worker-W.log (stdout+stderr), worker-W.pid (process group of the run), worker-W.exit (status).

# Metadata server of the TPU VM (SAFEJAX_METADATA_URL overrides it, e.g. file:// in tests).
REMOTE_WORKER_ID='MD="${SAFEJAX_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"; W="${SAFEJAX_WORKER_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google "$MD/agent-worker-number" || hostname)}"'

# On a multi-host slice: the coordinator (worker 0, JAX's TPU coordinator port 8482), the process
# count and this process' index, from the same metadata that JAX's own TPU detection reads
# (agent-worker-number, worker-network-endpoints "name:id:ip,..." or "host,...").  safejax's
# maybe_initialize_distributed() passes them to jax.distributed.initialize().
REMOTE_DISTRIBUTED_ENV='EP="$(curl -sf -m 5 -H Metadata-Flavor:Google "$MD/worker-network-endpoints" || true)"; N="$(printf "%s\n" "$EP" | tr "," "\n" | grep -c . || true)"; if [ -z "${SAFEJAX_COORDINATOR:-}" ] && [ "$N" -gt 1 ]; then export SAFEJAX_COORDINATOR="$(printf "%s\n" "$EP" | cut -d, -f1 | awk -F: "{print \$NF}"):8482" SAFEJAX_NUM_PROCESSES="$N" SAFEJAX_PROCESS_ID="$W"; fi'

default_run_dir() {
  printf '%s' "${OPT_RUN_DIR:-\$HOME/safejax-run}"
}

remote_prelude() { # RUN_DIR
  printf '%s' "RUN_DIR=$(remote_path "$1"); $REMOTE_WORKER_ID"
}

# remote_launch_line RUN_DIR WORKDIR VENV CMD_STRING ENV_ASSIGNMENTS...
remote_launch_line() {
  local run_dir="$1" workdir="$2" venv="$3" cmd_str="$4"
  shift 4
  local inner line kv
  # The wrapper outlives a SIGTERM sent to the group (launch.sh --stop, host shutdown) and then
  # records 143 even if COMMAND saved and exited 0, so that a stopped run never reads as finished;
  # COMMAND itself gets the default SIGTERM disposition.
  inner='trap "SAFEJAX_TERM=1" TERM; '"$cmd_str"'; rc=$?; if [ -n "${SAFEJAX_TERM:-}" ]; then rc=143; fi; echo "$rc" > "$SAFEJAX_RUN_DIR/worker-$SAFEJAX_WORKER_ID.exit"'
  line="set -eu; $(remote_prelude "$run_dir")"
  line+='; mkdir -p "$RUN_DIR"'
  line+='; if [ -f "$RUN_DIR/worker-$W.pid" ] && kill -0 "$(cat "$RUN_DIR/worker-$W.pid")" 2>/dev/null; then echo "worker $W: a run is still alive in $RUN_DIR (pid $(cat "$RUN_DIR/worker-$W.pid")); stop it first with launch.sh --stop" >&2; exit 3; fi'
  line+='; rm -f "$RUN_DIR/worker-$W.exit"'
  line+="; cd $(remote_path "$workdir")"
  line+="; . $(remote_path "$venv/bin/activate")"
  line+='; export SAFEJAX_RUN_DIR="$RUN_DIR" SAFEJAX_WORKER_ID="$W"'
  line+="; $REMOTE_DISTRIBUTED_ENV"
  for kv in "$@"; do
    line+="; export ${kv%%=*}=$(dq "${kv#*=}")"
  done
  line+="; nohup setsid bash -c $(_squote "$inner")"' > "$RUN_DIR/worker-$W.log" 2>&1 < /dev/null & echo $! > "$RUN_DIR/worker-$W.pid"'
  line+='; echo "worker $W: started pid $(cat "$RUN_DIR/worker-$W.pid"), log $RUN_DIR/worker-$W.log"'
  printf '%s' "$line"
}

remote_stop_line() { # RUN_DIR
  local line
  line="$(remote_prelude "$1")"
  line+='; P="$(cat "$RUN_DIR/worker-$W.pid" 2>/dev/null || true)"'
  line+='; if [ -n "$P" ] && kill -0 "$P" 2>/dev/null; then kill -TERM -- "-$P" 2>/dev/null || kill -TERM "$P"; for _ in $(seq 120); do kill -0 "$P" 2>/dev/null || break; sleep 1; done; kill -KILL -- "-$P" 2>/dev/null || true; echo "worker $W: stopped pid $P"; else echo "worker $W: no run alive in $RUN_DIR"; fi'
  printf '%s' "$line"
}

remote_status_line() { # RUN_DIR
  local line
  line="$(remote_prelude "$1")"
  line+='; if [ -f "$RUN_DIR/worker-$W.exit" ]; then echo "safejax-status $W EXIT $(cat "$RUN_DIR/worker-$W.exit")"'
  line+='; elif [ -f "$RUN_DIR/worker-$W.pid" ] && kill -0 "$(cat "$RUN_DIR/worker-$W.pid")" 2>/dev/null; then echo "safejax-status $W RUNNING"'
  line+='; elif [ -f "$RUN_DIR/worker-$W.pid" ]; then echo "safejax-status $W DEAD"'
  line+='; else echo "safejax-status $W NONE"; fi'
  printf '%s' "$line"
}

remote_logs_line() { # RUN_DIR LINES FOLLOW(0|1)
  local line
  line="$(remote_prelude "$1")"
  if (($3)); then
    line+="; tail -n $2 -F \"\$RUN_DIR/worker-\$W.log\" | sed -u \"s/^/[worker \$W] /\""
  else
    line+="; tail -n $2 \"\$RUN_DIR/worker-\$W.log\" | sed \"s/^/[worker \$W] /\""
  fi
  printf '%s' "$line"
}

# run_verdict HOSTS STATUS_LINES: what watch.sh does with the "safejax-status W STATE" lines of
# launch.sh --status.  Prints one word:
#   unknown  fewer lines than hosts (ssh trouble): look again later
#   done     every worker exited 0
#   failed   a worker exited non-zero (other than 143)
#   restart  a worker has no live run (DEAD, NONE) or was stopped by SIGTERM (EXIT 143)
#   running  every worker is running
run_verdict() {
  local hosts="$1" lines="$2" line w state code
  local total=0 exit0=0 failed=0 restart=0 running=0
  local -A seen=()
  while IFS= read -r line; do
    [[ "$line" =~ ^safejax-status\ ([^ ]+)\ (RUNNING|DEAD|NONE|EXIT\ (-?[0-9]+))$ ]] || continue
    w="${BASH_REMATCH[1]}" state="${BASH_REMATCH[2]}" code="${BASH_REMATCH[3]}"
    [[ -z "${seen[$w]:-}" ]] || continue
    seen[$w]=1
    total=$((total + 1))
    case "$state" in
      RUNNING) running=$((running + 1)) ;;
      DEAD | NONE) restart=$((restart + 1)) ;;
      EXIT*)
        if [[ "$code" == 0 ]]; then exit0=$((exit0 + 1))
        elif [[ "$code" == 143 ]]; then restart=$((restart + 1))
        else failed=$((failed + 1)); fi ;;
    esac
  done <<<"$lines"
  if ((total < hosts)); then echo unknown
  elif ((failed > 0)); then echo failed
  elif ((exit0 == total)); then echo "done"
  elif ((restart > 0)); then echo restart
  else echo running; fi
}
