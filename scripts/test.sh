#!/usr/bin/env bash
# The test suite: set up .venv with the test extras, then run pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,sdm-pretrained
bash scripts/install_browser.sh   # headless Chromium for the report's browser test (no-op if present / not root)
exec .venv/bin/python -m pytest -rs "$@"
