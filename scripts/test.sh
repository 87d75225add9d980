#!/usr/bin/env bash
# The project's test command: build the environment if needed, lint, then run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/clip_model -k tokenizer
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict --follow-imports=silent indexer app clip_model
.venv/bin/python -m pytest "$@"
