#!/usr/bin/env bash
# The GPU smoke run: every step the visible GPUs allow (serving, mixing, scoring, training, the
# whole pipeline on SmolLM2-135M-Instruct), each checking a number against a CPU float64 reference,
# then one table of steps: passed, failed, or skipped with the reason (e.g. "needs 2 GPUs, 1 visible").
# Needs a CUDA build of torch (install without -c constraints-cpu.txt); 2 GPUs reach every step.
#
#   bash bench/gpu_smoke.sh [OUT_DIR] [--only NAME ...]    # exit status 1 if any step failed
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec python "$(dirname "$0")/gpu_smoke.py" "$@"
