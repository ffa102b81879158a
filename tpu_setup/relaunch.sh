#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Rebuild a slice from scratch and start the same run again: delete, create, install, copy data,
# launch.  The run resumes from the latest checkpoint in its out_dir (same command, same out_dir).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: relaunch.sh --name NAME --zone ZONE --accelerator-type TYPE [create/install/data/launch options] -- COMMAND...

Steps (each one is the script of the same name, with the options that belong to it):
  1. teardown.sh --if-exists      delete the preempted slice (or queued resource)
  2. create.sh --wait             create it again (queued requests wait until ACTIVE)
  3. install.sh                   venv + a wheel of this checkout on every worker
  4. copy_data.sh                 only if --copy / --from-gcs / --gcsfuse are given
  5. launch.sh -- COMMAND         the same command on every worker

Local disks are new after step 2, so out_dir must live in a bucket (a --gcsfuse mount, e.g.
out_dir=/mnt/runs/ppo-lag): safejax finds the latest checkpoint there and resumes.

create:  --accelerator-type T (required) --version V --spot --preemptible --queued --qr-id ID
         --wait-interval S --gcloud-arg ARG (repeatable)
install: --source SRC --python PYTHON --venv DIR
data:    --copy SRC[=DEST] --from-gcs GS_URL[=DEST] --gcsfuse BUCKET[/PREFIX][=MOUNT] (repeatable)
launch:  --run-dir DIR --workdir DIR --env KEY=VALUE (repeatable)
common:  --name NAME --zone ZONE --project P --internal-ip --dry-run -h/--help
USAGE
}

parse_args "name zone project accelerator-type version spot preemptible queued qr-id wait-interval gcloud-arg source python venv copy from-gcs gcsfuse run-dir workdir env internal-ip dry-run" "$@"
require_name
require_zone
require_accelerator
((${#CMD_ARGS[@]} > 0)) || die "relaunch.sh: missing command; put it after --, e.g. -- safejax ppo-lag --config CONFIG.yaml out_dir=/mnt/runs/ppo-lag"

common=(--name "$OPT_NAME" --zone "$OPT_ZONE")
if [[ -n "$OPT_PROJECT" ]]; then common+=(--project "$OPT_PROJECT"); fi
if ((DRY_RUN)); then common+=(--dry-run); fi
ssh_opts=()
if ((OPT_INTERNAL_IP)); then ssh_opts+=(--internal-ip); fi

queued=()
if ((OPT_QUEUED)); then
  queued+=(--queued)
  if [[ -n "$OPT_QR_ID" ]]; then queued+=(--qr-id "$OPT_QR_ID"); fi
fi

create=(--accelerator-type "$ACCEL_TYPE" --wait)
if [[ -n "$OPT_VERSION" ]]; then create+=(--version "$OPT_VERSION"); fi
if ((OPT_SPOT)); then create+=(--spot); fi
if ((OPT_PREEMPTIBLE)); then create+=(--preemptible); fi
if [[ -n "$OPT_WAIT_INTERVAL" ]]; then create+=(--wait-interval "$OPT_WAIT_INTERVAL"); fi
for a in "${OPT_GCLOUD_ARGS[@]}"; do create+=("--gcloud-arg=$a"); done

install=()
if [[ -n "$OPT_SOURCE" ]]; then install+=(--source "$OPT_SOURCE"); fi
if [[ -n "$OPT_PYTHON" ]]; then install+=(--python "$OPT_PYTHON"); fi
if [[ -n "$OPT_VENV" ]]; then install+=(--venv "$OPT_VENV"); fi

data=()
for s in "${OPT_COPYS[@]}"; do data+=(--copy "$s"); done
for s in "${OPT_FROM_GCSS[@]}"; do data+=(--from-gcs "$s"); done
for s in "${OPT_GCSFUSES[@]}"; do data+=(--gcsfuse "$s"); done

launch=()
if [[ -n "$OPT_RUN_DIR" ]]; then launch+=(--run-dir "$OPT_RUN_DIR"); fi
if [[ -n "$OPT_WORKDIR" ]]; then launch+=(--workdir "$OPT_WORKDIR"); fi
if [[ -n "$OPT_VENV" ]]; then launch+=(--venv "$OPT_VENV"); fi
# shellcheck disable=SC2153  # OPT_ENVS is filled by parse_args
for kv in "${OPT_ENVS[@]}"; do launch+=(--env "$kv"); done

note "relaunch 1/5: delete the old slice"
bash "$HERE/teardown.sh" "${common[@]}" "${queued[@]}" --if-exists
note "relaunch 2/5: create $ACCEL_TYPE ($ACCEL_HOSTS hosts)"
bash "$HERE/create.sh" "${common[@]}" "${queued[@]}" "${create[@]}"
note "relaunch 3/5: install safejax on every worker"
bash "$HERE/install.sh" "${common[@]}" "${ssh_opts[@]}" "${install[@]}"
if ((${#data[@]})); then
  note "relaunch 4/5: data"
  bash "$HERE/copy_data.sh" "${common[@]}" "${ssh_opts[@]}" "${data[@]}"
else
  note "relaunch 4/5: no data options given"
fi
note "relaunch 5/5: launch the same command (it resumes from the latest checkpoint in its out_dir)"
bash "$HERE/launch.sh" "${common[@]}" "${ssh_opts[@]}" "${launch[@]}" -- "${CMD_ARGS[@]}"
