#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run one command on every worker of a slice at once (JAX multi-controller), in the background.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]
       launch.sh --name NAME --zone ZONE --stop | --status [--run-dir DIR]

Start COMMAND on all workers at the same moment (gcloud compute tpus tpu-vm ssh --worker=all),
detached with nohup/setsid so it survives the ssh session.  On each worker W, inside the run
directory RUN_DIR:
  worker-W.log    stdout and stderr          worker-W.pid   process group of the run
  worker-W.exit   exit status, once it ended
COMMAND runs in WORKDIR with the virtual environment activated and SAFEJAX_RUN_DIR=RUN_DIR,
SAFEJAX_WORKER_ID=W exported; on a multi-host slice also SAFEJAX_COORDINATOR (worker 0, port 8482),
SAFEJAX_NUM_PROCESSES and SAFEJAX_PROCESS_ID, read from the TPU VM metadata server, with which
safejax calls jax.distributed.initialize().  The words of COMMAND are passed as they are (no shell
on the worker reinterprets them); for pipes or variables use: -- bash -c '...'.

Example (PPO-Lagrangian on every host; safejax calls jax.distributed.initialize() itself):
  launch.sh --name my-tpu --zone us-central2-b --accelerator-type v4-32 --follow -- \
    safejax ppo-lag --config experiments/configs/ppo_lag.yaml out_dir=/mnt/runs/ppo-lag

Required:
  --name NAME, --zone ZONE
Options:
  --run-dir DIR          run directory on the workers (default: $HOME/safejax-run)
  --workdir DIR          working directory for COMMAND (default: $HOME)
  --venv DIR             virtual environment made by install.sh (default: $HOME/safejax-venv)
  --env KEY=VALUE        export an environment variable for COMMAND, repeatable
                         (VALUE may use $HOME; it is visible in --dry-run output and ps)
  --accelerator-type T   print the slice shape (hosts, chips, HBM) before launching
  --follow               stream worker 0's log after launching (Ctrl-C stops streaming only)
  --stop                 stop the run in RUN_DIR on every worker (SIGTERM to its process group,
                         SIGKILL after 120 s); safejax saves a checkpoint on SIGTERM when it can
  --status               print "safejax-status W RUNNING|EXIT n|DEAD|NONE" for every worker
  --project PROJECT
  --internal-ip          reach the workers by internal IP
  --dry-run              print the commands instead of running them
  -h, --help             this text
USAGE
}

parse_args "name zone project run-dir workdir venv env accelerator-type follow stop status internal-ip dry-run" "$@"
require_name
require_zone
RUN_DIR="$(default_run_dir)"
# shellcheck disable=SC2016  # $HOME is expanded on the worker
WORKDIR="${OPT_WORKDIR:-\$HOME}"
# shellcheck disable=SC2016
VENV="${OPT_VENV:-\$HOME/safejax-venv}"

if ((OPT_STOP + OPT_STATUS > 1)); then die "launch.sh: choose one of --stop and --status"; fi
if ((OPT_STOP || OPT_STATUS)); then
  ((${#CMD_ARGS[@]} == 0)) || die "launch.sh: --stop/--status take no command"
  if ((OPT_STOP)); then
    ssh_workers all "$(remote_stop_line "$RUN_DIR")"
  else
    ssh_workers all "$(remote_status_line "$RUN_DIR")"
  fi
  exit 0
fi

((${#CMD_ARGS[@]} > 0)) || die "launch.sh: missing command; put it after --, e.g. launch.sh --name NAME --zone ZONE -- safejax ppo-lag --config CONFIG.yaml"
for kv in "${OPT_ENVS[@]}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "launch.sh: --env '$kv' is not KEY=VALUE"
done

if [[ -n "$OPT_ACCELERATOR_TYPE" ]]; then
  accelerator_info "$OPT_ACCELERATOR_TYPE"
  info "launch.sh: $ACCEL_TYPE: $ACCEL_HOSTS hosts x $ACCEL_CHIPS_PER_HOST chips = $ACCEL_CHIPS chips (JAX devices), ${ACCEL_HBM_GIB} GiB HBM per chip, $((ACCEL_HBM_GIB * ACCEL_CHIPS)) GiB in all"
  info "launch.sh: mesh.data * mesh.fsdp * mesh.tensor must equal $ACCEL_CHIPS (use -1 for one axis); memory per chip: python -m safejax.memory_table"
fi

CMD_STR="$(render_cmd "${CMD_ARGS[@]}")"
ssh_workers all "$(remote_launch_line "$RUN_DIR" "$WORKDIR" "$VENV" "$CMD_STR" "${OPT_ENVS[@]}")"

if ((OPT_FOLLOW)); then
  ssh_workers 0 "$(remote_logs_line "$RUN_DIR" 100 1)"
fi
