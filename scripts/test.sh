#!/usr/bin/env bash
# The test suite: set up .venv with the test extras, then run pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,sdm-pretrained
exec .venv/bin/python -m pytest "$@"
