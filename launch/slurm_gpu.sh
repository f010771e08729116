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
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
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
