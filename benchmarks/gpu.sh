#!/usr/bin/env bash
# The GPU run in one command (benchmarks/gpu.py): from the repo root, whatever folder it is called from, so relative
# --wheels / --out paths are taken from the repo root.  benchmarks/gpu.sh --help lists the options.
cd "$(dirname "$0")/.." || exit 1
exec python -m benchmarks.gpu "$@"
