#!/usr/bin/env bash
# The main job: set up .venv, train the default `digits` columnformer on the embedded digits set,
# evaluate it on the test split, and write runs/digits/. Extra arguments are config overrides,
# e.g. `bash scripts/main.sh preset=digits-vit name=digits-vit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# glibc malloc backs large blocks with transparent huge pages: fewer page faults, same results (runtime.py)
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
exec .venv/bin/columnformer train --config configs/digits.yaml --overwrite "$@"
