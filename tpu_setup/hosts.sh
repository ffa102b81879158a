#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Print the host (TPU VM worker) and chip count of a Cloud TPU accelerator type.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: hosts.sh ACCELERATOR_TYPE [--field NAME]

Print the shape of a Cloud TPU slice as one line of key=value pairs:
  accelerator=v4-32 generation=v4 hosts=4 chips=16 chips_per_host=4 cores=32 hbm_gib_per_chip=32 hbm_gib_total=512 runtime=tpu-ubuntu2204-base

  hosts      TPU VM workers (= jax.process_count(), the hosts that --worker=all reaches)
  chips      TPU chips (= jax.device_count(): v4 and v5p run 2 TensorCores per chip as one device)
  runtime    the default --version / --runtime-version for create.sh

Accelerator types: v4-N and v5p-N count TensorCores (2 per chip, 4 chips per host);
v5litepod-N (alias v5e-N) and v6e-N count chips (one VM up to 8 chips, 4-chip VMs above).

Options:
  --field NAME   print only that value (hosts, chips, chips_per_host, cores, hbm_gib_per_chip,
                 hbm_gib_total, runtime, accelerator, generation)
  -h, --help     this text
USAGE
}

TYPE=""
FIELD=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --field) (($# >= 2)) || die "hosts.sh: option --field needs a value"; FIELD="$2"; shift 2 ;;
    --field=*) FIELD="${1#*=}"; shift ;;
    -*) die "hosts.sh: unknown option '$1' (see --help)" ;;
    *) [[ -z "$TYPE" ]] || die "hosts.sh: one accelerator type only (got '$TYPE' and '$1')"; TYPE="$1"; shift ;;
  esac
done
[[ -n "$TYPE" ]] || die "hosts.sh: missing accelerator type (e.g. hosts.sh v4-32)"
accelerator_info "$TYPE"

case "$FIELD" in
  "") printf 'accelerator=%s generation=%s hosts=%s chips=%s chips_per_host=%s cores=%s hbm_gib_per_chip=%s hbm_gib_total=%s runtime=%s\n' \
        "$ACCEL_TYPE" "$ACCEL_GEN" "$ACCEL_HOSTS" "$ACCEL_CHIPS" "$ACCEL_CHIPS_PER_HOST" "$ACCEL_CORES" \
        "$ACCEL_HBM_GIB" "$((ACCEL_HBM_GIB * ACCEL_CHIPS))" "$ACCEL_RUNTIME" ;;
  accelerator) echo "$ACCEL_TYPE" ;;
  generation) echo "$ACCEL_GEN" ;;
  hosts) echo "$ACCEL_HOSTS" ;;
  chips) echo "$ACCEL_CHIPS" ;;
  chips_per_host) echo "$ACCEL_CHIPS_PER_HOST" ;;
  cores) echo "$ACCEL_CORES" ;;
  hbm_gib_per_chip) echo "$ACCEL_HBM_GIB" ;;
  hbm_gib_total) echo "$((ACCEL_HBM_GIB * ACCEL_CHIPS))" ;;
  runtime) echo "$ACCEL_RUNTIME" ;;
  *) die "hosts.sh: unknown --field '$FIELD' (hosts, chips, chips_per_host, cores, hbm_gib_per_chip, hbm_gib_total, runtime, accelerator, generation)" ;;
esac
