#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install everything the tests need.
# Idempotent: reinstalls only when pyproject.toml or this script changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0          # CPU build available from local disk; a bare "torch" would pull a multi-GB CUDA build
CLIP_REFERENCE=clip-anytorch==2.6.0   # OpenAI's reference code, for parity tests only; its torchvision dep is skipped

stamp="$VENV/.installed-$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==$TORCH_VERSION"          # first, so nothing below pulls another torch build
"${pip[@]}" install -e ".[test,ray]"                # ray: the Ray engine's tests (tests/indexer/test_ray_engine.py)
"${pip[@]}" install --no-deps "$CLIP_REFERENCE"    # never install torchvision: it breaks beside this torch build
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "environment ready in $VENV"
