#!/usr/bin/env bash
# Run the main job on GPU nodes of a SLURM cluster, one process per node (all its GPUs).
#
#   bash launch/slurm_gpu.sh [--nodes N] [--gpus-per-node G] [--time HH:MM:SS]
#       [--partition P] [--account A] [--dry-run] CONFIG WORKDIR [--config.field=value ...]
#
# It submits this script with sbatch. Inside the allocation, the script installs the CUDA
# dependencies once (bash launch/setup.sh cuda12) and starts ckt_jax.main on every node with
# srun. JAX reads the process count, rank and coordinator from the SLURM variables. The
# repository and WORKDIR must be mounted at the same path on every node. SLURM sends SIGTERM
# 120 s before the time limit (--signal), the run saves a checkpoint and exits, and a requeued
# or resubmitted job resumes from it. --dry-run prints the sbatch command and the commands the
# job runs, and runs nothing.
# NOTE: tested only through --dry-run, not on a SLURM cluster.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Inside the job, sbatch runs a copy of this script from its spool directory; --chdir makes the
# working directory the repository.
if [ "${1:-}" = "--in-job" ]; then
  root="$PWD"
fi
source "$root/launch/common.sh"

usage="usage: bash launch/slurm_gpu.sh [--nodes N] [--gpus-per-node G] [--time HH:MM:SS]"
usage+=" [--partition P] [--account A] [--dry-run] CONFIG WORKDIR [--config.field=value ...]"
nodes=2 gpus=8 time_limit="04:00:00" partition="" account="" in_job=""
split_dry_run "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) require_value slurm_gpu.sh 2 "$@"; nodes="$2"; shift 2
      require_positive_int slurm_gpu.sh --nodes "$nodes" ;;
    --gpus-per-node) require_value slurm_gpu.sh 8 "$@"; gpus="$2"; shift 2
      require_positive_int slurm_gpu.sh --gpus-per-node "$gpus" ;;
    --time) require_value slurm_gpu.sh 04:00:00 "$@"; time_limit="$2"; shift 2
      if ! [[ "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]]; then
        echo "slurm_gpu.sh: --time must be a SLURM time such as 04:00:00 or 1-00:00:00," \
          "got '$time_limit'" >&2
        exit 2
      fi
      if [ "$(slurm_seconds "$time_limit")" -lt 600 ]; then
        echo "slurm_gpu.sh: --time $time_limit is under 10 minutes, too short for set-up and" \
          "a checkpoint before SLURM's SIGTERM 120 s ahead of the limit; pass 00:10:00 or more" >&2
        exit 2
      fi ;;
    --partition) require_value slurm_gpu.sh gpu "$@"; partition="$2"; shift 2 ;;
    --account) require_value slurm_gpu.sh my-account "$@"; account="$2"; shift 2 ;;
    --in-job) in_job=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --config.*) break ;;
    -*) echo "slurm_gpu.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "slurm_gpu.sh: missing CONFIG or WORKDIR; $usage" >&2
  exit 2
fi
config="$1" workdir="$2"
shift 2
if [ -z "$in_job" ]; then
  check_cluster_args slurm_gpu.sh "$root" "$config" "$workdir" "$@"
fi

job_commands() {
  run_command bash launch/setup.sh cuda12
  exec_command srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    env JAX_PLATFORMS=cuda .venv/bin/python -m ckt_jax.main \
    --config "$config" --workdir "$workdir" "$@"
}

if [ -n "$in_job" ]; then
  job_commands "$@"
fi

sbatch_args=("--nodes=$nodes" --ntasks-per-node=1 "--gpus-per-node=$gpus" "--time=$time_limit"
             --job-name=ckt_jax "--chdir=$root" --output=slurm-ckt_jax-%j.out
             --signal=TERM@120 --requeue)
if [ -n "$partition" ]; then
  sbatch_args+=("--partition=$partition")
fi
if [ -n "$account" ]; then
  sbatch_args+=("--account=$account")
fi
run_command sbatch "${sbatch_args[@]}" launch/slurm_gpu.sh --in-job "$config" "$workdir" "$@"
if [ -n "${DRY_RUN:-}" ]; then
  echo "# inside the allocation, on the first node:"
  job_commands "$@"
fi
