#!/usr/bin/env bash
# GPU check (at most ~5 minutes, no downloads): engine vs transformers on the GPU, split serving on
# the GPU over gRPC, and over NCCL where two GPUs exist. Needs only torch, grpcio,
# grpcio-health-checking, safetensors, tokenizers, jinja2 and transformers already installed.
#   bench/gpu_check.sh                      # on a GPU machine
#   bench/gpu_check.sh --device cpu --quick # check the script itself on a CPU
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# Import `phasesplit` from the source tree without installing it: worker/phasesplit is the package,
# proto/phasesplit/v1 its `v1` and operator/phasesplit/operator its `operator` (as pyproject maps them).
if ! "$PYTHON" -c "import phasesplit.v1, phasesplit.engine" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/phasesplit"
  cat > "$SHIM/phasesplit/__init__.py" <<EOF
__path__ = ["$REPO/worker/phasesplit", "$REPO/proto/phasesplit", "$REPO/operator/phasesplit"]
EOF
  ln -s "$REPO/worker/phasesplit/data" "$SHIM/phasesplit/data"  # package data (the tokenizer corpus)
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout 300 "$PYTHON" "$REPO/bench/gpu_check.py" "$@"
