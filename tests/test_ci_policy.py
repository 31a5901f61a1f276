"""Under CI=true a skipped test fails the run, except for hardware CI lacks (issue 16: no silent skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

SAMPLE = '''
import pytest

def test_needs_a_missing_extra():
    pytest.importorskip("no_such_module_for_columnformer")

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_cuda_only():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())  # the suite's own hooks
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_dependency_fails_under_ci_and_cuda_skips_stay_skips(tmp_path):
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    assert "1 failed" in ci.stdout and "1 skipped" in ci.stdout
    assert "skipped under CI=true" in ci.stdout and "needs a CUDA GPU" in ci.stdout
    local = _run(tmp_path, None)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout
