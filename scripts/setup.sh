#!/usr/bin/env bash
# Create .venv in the repository and install columnformer with what it needs. Idempotent and quick
# when nothing changed. PyTorch: an existing torch in .venv is kept (GPU users: install your own
# build into .venv first, or set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.5.1"); otherwise the CPU build
# torch==2.13.0 is installed (on this project's machines pip takes it from a local wheel; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to fetch the CPU wheel instead of a CUDA one).
# Usage: scripts/setup.sh [extra,...]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  spec="${TORCH_SPEC:-torch==2.13.0}"
  echo "setup: installing PyTorch ($spec)" >&2
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VPY" -m pip install -q --disable-pip-version-check "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "$VPY" -m pip install -q --disable-pip-version-check "$spec"
  fi
fi
stamp=".venv/.columnformer-setup-$( (cat pyproject.toml requirements/*.txt; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || ! "$VPY" -c "import columnformer" >/dev/null 2>&1; then
  if [[ ",$extras," == *",sdm-pretrained,"* ]]; then
    # hash-pinned, exact set: no resolver run, so nothing can pull in another torch build
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/sdm-pretrained.txt
    extras=$(echo ",$extras," | sed 's/,sdm-pretrained,/,/; s/^,//; s/,$//')
  fi
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  echo "setup: installing columnformer${extras:+ with extras [$extras]}" >&2
  "$VPY" -m pip install -q --disable-pip-version-check -e "$target" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VPY" -c "import columnformer, torch; print('setup: columnformer', columnformer.__version__, 'torch', torch.__version__)" >&2
  rm -f .venv/.columnformer-setup-*
  touch "$stamp"
fi
