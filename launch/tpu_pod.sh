#!/usr/bin/env bash
# Run the main job on every worker of a Cloud TPU VM pod slice, one process per worker.
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--dry-run] \
#       CONFIG WORKDIR [--config.field=value ...]
#
# It packs the committed tree (git HEAD), copies it to every worker, and there installs the TPU
# dependencies (bash launch/setup.sh tpu) and starts ckt_jax.main with
# --config.distributed.initialize=on, so JAX finds the other workers itself. WORKDIR must be
# mounted at the same path on every worker (NFS or gcsfuse), because the workers share its
# checkpoints and stage outputs. A pre-empted run saves a checkpoint on SIGTERM, and the same
# command run again resumes from it. --dry-run prints the commands and runs nothing.
# NOTE: tested only through --dry-run; the gcloud flags follow the gcloud reference for
# `compute tpus tpu-vm scp` and `ssh`, and the TPU image must provide python3 with venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"

usage="usage: bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--dry-run]"
usage+=" CONFIG WORKDIR [--config.field=value ...]"
tpu="" zone="" project=""
split_dry_run "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) require_value tpu_pod.sh my-v5e-32 "$@"; tpu="$2"; shift 2 ;;
    --zone) require_value tpu_pod.sh us-west4-a "$@"; zone="$2"; shift 2 ;;
    --project) require_value tpu_pod.sh my-project "$@"; project="$2"; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --config.*) break ;;
    -*) echo "tpu_pod.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ -z "$tpu" ] || [ -z "$zone" ] || [ $# -lt 2 ]; then
  echo "tpu_pod.sh: missing --tpu, --zone, CONFIG or WORKDIR; $usage" >&2
  exit 2
fi
config="$1" workdir="$2"
shift 2
check_cluster_args tpu_pod.sh "$root" "$config" "$workdir" "$@"
# The workers get the committed tree (git HEAD), so what this checkout runs must be committed.
config_file="$(config_file_of "$root" "$config")"
if ! git -C "$root" ls-files --error-unmatch "$config_file" >/dev/null 2>&1; then
  echo "tpu_pod.sh: $config_file is not committed, and the workers get the committed tree" \
    "(git HEAD); commit it first" >&2
  exit 2
fi
if ! git -C "$root" diff --quiet HEAD -- ckt_jax configs launch pyproject.toml; then
  echo "tpu_pod.sh: warning: ckt_jax/, configs/, launch/ or pyproject.toml differ from git" \
    "HEAD, and the workers run the committed version; commit the changes to run them" >&2
fi

gcloud_flags=(--worker=all "--zone=$zone")
if [ -n "$project" ]; then
  gcloud_flags+=("--project=$project")
fi
archive="/tmp/ckt_jax-$tpu.tar.gz"
remote_command="$(quote_command mkdir -p ckt_jax)"
remote_command+=" && $(quote_command tar -xzf ckt_jax.tar.gz -C ckt_jax)"
remote_command+=" && cd ckt_jax && $(quote_command bash launch/setup.sh tpu)"
remote_command+=" && $(quote_command env JAX_PLATFORMS=tpu .venv/bin/python -m ckt_jax.main \
  --config "$config" --workdir "$workdir" --config.distributed.initialize=on "$@")"

run_command git -C "$root" archive --format=tar.gz "--output=$archive" HEAD
run_command gcloud compute tpus tpu-vm scp "$archive" "$tpu:ckt_jax.tar.gz" "${gcloud_flags[@]}"
exec_command gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" "--command=$remote_command"
