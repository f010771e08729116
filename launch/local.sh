#!/usr/bin/env bash
# Set up .venv/ and run the main job on this machine's CPU.
#   bash launch/local.sh                                   # configs/smollm2_cpu.py -> runs/smollm2_cpu
#   bash launch/local.sh configs/smoke.py /tmp/smoke [--config.field=value ...]
#   bash launch/local.sh [config] [workdir] ... --dry-run   # print the commands, run nothing
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source launch/common.sh
split_dry_run "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
config="${1:-configs/smollm2_cpu.py}"
workdir="${2:-runs/$(basename "$config" .py)}"
shift $(( $# > 2 ? 2 : $# ))
run_command bash launch/setup.sh
# JAX_PLATFORMS=cpu skips the probe for TPU and GPU back-ends, which only logs warnings here.
exec_command env "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" .venv/bin/python -m ckt_jax.main \
  --config "$config" --workdir "$workdir" "$@"
