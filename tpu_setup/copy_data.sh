#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2016  # single-quoted $VARs in remote lines expand on the worker
# Put data on every worker: copy a local folder, sync a GCS prefix, or mount a bucket with gcsfuse.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: copy_data.sh --name NAME --zone ZONE (--copy SRC[=DEST] | --from-gcs GS_URL[=DEST] | --gcsfuse BUCKET[/PREFIX][=MOUNT])... [options]

Every option below runs on all workers at once and may be repeated.

  --copy SRC[=DEST]         scp the local folder or file SRC into the worker folder DEST
                            (default $HOME): DEST/<basename of SRC>.
                            gcloud compute tpus tpu-vm scp --recurse SRC NAME:DEST --worker=all
  --from-gcs GS_URL[=DEST]  each worker syncs gs://bucket/path into DEST/<basename of path>
                            (default DEST $HOME) with gcloud storage rsync --recursive.
  --gcsfuse BUCKET[/PREFIX][=MOUNT]
                            mount gs://BUCKET (only PREFIX, if given) at MOUNT (default /mnt/BUCKET)
                            with Cloud Storage FUSE, installing gcsfuse if missing.  Mounted with
                            --implicit-dirs and --rename-dir-limit so that checkpoint folders can
                            be renamed.  Use this for out_dir: it outlives a preempted slice.

Remote paths may use $HOME (single-quote it: '$HOME/data'); relative paths are under $HOME.

Required:
  --name NAME, --zone ZONE
Options:
  --project PROJECT
  --internal-ip             reach the workers by internal IP
  --dry-run                 print the commands instead of running them
  -h, --help                this text
USAGE
}

parse_args "name zone project copy from-gcs gcsfuse internal-ip dry-run" "$@"
((${#CMD_ARGS[@]} == 0)) || die "copy_data.sh: unexpected arguments after --: ${CMD_ARGS[*]}"
require_name
require_zone
if ((${#OPT_COPYS[@]} + ${#OPT_FROM_GCSS[@]} + ${#OPT_GCSFUSES[@]} == 0)); then
  die "copy_data.sh: nothing to do; give --copy SRC[=DEST], --from-gcs gs://...[=DEST] or --gcsfuse BUCKET[=MOUNT]"
fi

location_flags

# split "SRC=DEST" -> SPEC_SRC, SPEC_DEST (DEST defaults to $2)
split_spec() {
  local spec="$1" default_dest="$2"
  if [[ "$spec" == *=* ]]; then
    SPEC_SRC="${spec%%=*}"
    SPEC_DEST="${spec#*=}"
  else
    SPEC_SRC="$spec"
    SPEC_DEST="$default_dest"
  fi
  [[ -n "$SPEC_SRC" ]] || die "copy_data.sh: empty source in '$spec'"
  [[ -n "$SPEC_DEST" ]] || die "copy_data.sh: empty destination in '$spec'"
}

# shellcheck disable=SC2016  # $HOME is expanded on the worker
HOME_REMOTE='$HOME'

for spec in "${OPT_COPYS[@]}"; do
  split_spec "$spec" "$HOME_REMOTE"
  [[ -e "$SPEC_SRC" ]] || die "copy_data.sh: --copy source '$SPEC_SRC' does not exist on this machine"
  ssh_workers all "mkdir -p $(remote_path "$SPEC_DEST")"
  scp_cmd=("$GCLOUD" compute tpus tpu-vm scp)
  if [[ -d "$SPEC_SRC" ]]; then scp_cmd+=(--recurse); fi
  scp_cmd+=("$SPEC_SRC" "$OPT_NAME:$(scp_path "$SPEC_DEST")" "${LOCATION[@]}" --worker=all)
  if ((OPT_INTERNAL_IP)); then scp_cmd+=(--internal-ip); fi
  run "${scp_cmd[@]}"
done

for spec in "${OPT_FROM_GCSS[@]}"; do
  # gs://bucket/path=DEST: split at the first "=" after the URL scheme
  [[ "$spec" == gs://* ]] || die "copy_data.sh: --from-gcs needs a gs:// URL, got '$spec'"
  split_spec "$spec" "$HOME_REMOTE"
  url="${SPEC_SRC%/}"
  base="${url##*/}"
  [[ -n "$base" && "$url" != "gs:/" && "${url#gs://}" == */* ]] || die "copy_data.sh: --from-gcs '$SPEC_SRC' must name a folder inside a bucket (gs://bucket/folder)"
  dest="$(remote_path "${SPEC_DEST%/}/$base")"
  ssh_workers all "mkdir -p $dest && gcloud storage rsync --recursive $(dq "$url") $dest"
done

for spec in "${OPT_GCSFUSES[@]}"; do
  bucket_path="${spec%%=*}"
  bucket_path="${bucket_path#gs://}"
  bucket_path="${bucket_path%/}"
  bucket="${bucket_path%%/*}"
  prefix=""
  if [[ "$bucket_path" == */* ]]; then prefix="${bucket_path#*/}"; fi
  [[ "$bucket" =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] || die "copy_data.sh: --gcsfuse '$spec': '$bucket' is not a bucket name"
  split_spec "$spec" "/mnt/$bucket"
  mnt="$(remote_path "$SPEC_DEST")"
  opts="--implicit-dirs --rename-dir-limit=200000"
  if [[ -n "$prefix" ]]; then opts+=" --only-dir $(dq "$prefix")"; fi
  line='set -eu; if ! command -v gcsfuse >/dev/null 2>&1; then echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; fi'
  line+="; MNT=$mnt"
  line+='; sudo mkdir -p "$MNT"; sudo chown "$(id -u):$(id -g)" "$MNT"'
  line+="; if mountpoint -q \"\$MNT\"; then echo \"\$MNT is already mounted\"; else gcsfuse $opts $(dq "$bucket") \"\$MNT\"; fi"
  ssh_workers all "$line"
done
