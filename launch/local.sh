#!/usr/bin/env bash
# Start N JAX processes on this machine (gloo collectives, own CPU devices each).
#   launch/local.sh N [-- mmjax-train-flags | -- command ...]
# e.g. launch/local.sh 2 -- --config=configs/flamingo/tiny.py --workdir=work/mp
set -euo pipefail
n="${1:?usage: launch/local.sh N [-- args]}"; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${MMJAX_PYTHON:-$here/.venv/bin/python}"
exec "$py" -m mmjax.cli launch local --processes "$n" "$@"
