"""train.keep_host_memory: freed host memory stays in the process (no fresh page faults for the next tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from columnformer.config import build_config

PROBE = r"""
import resource, statistics, sys, torch
from columnformer.runtime import keep_host_memory
kept = keep_host_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(12):  # as each training step: two 64 MiB tensors allocated, written and freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(16 << 20)
    y.fill_(1.0)
    z = y * 2.0
    del y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
last = faults[-8:]
print(kept, min(last), int(statistics.median(last)), max(last))
"""


def _probe(mode: str) -> tuple[bool, int, int, int]:
    """(kept, min, median, max) page faults per step over the last 8 of 12 steps."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    kept, low, median, high = out.split()
    return kept == "True", int(low), int(median), int(high)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
def test_kept_host_memory_is_reused_without_page_faults():
    kept, kept_min, _, _ = _probe("keep")
    assert kept
    default_kept, default_min, _, _ = _probe("default")
    assert not default_kept
    # glibc's default unmaps the blocks on free: every step (the minimum) faults its 128 MiB in again (32,768 pages of
    # 4 KiB, or 64 huge pages where transparent huge pages back every mapping)
    assert default_min >= 64, default_min
    # kept: after the first steps (glibc's aligned allocations leave some gaps) the 128 MiB are reused, so some step
    # faults (almost) nothing. Not the median: on this VM the kernel now and then takes kept pages back (a kept
    # 32-64 MiB block re-faulted in half of 8 steps in one CI run, with no change to this code), so the steps'
    # fewest faults are compared against the default's fewest.
    assert kept_min * 4 < default_min, (kept_min, default_min)


def test_trainer_applies_keep_host_memory(monkeypatch, tmp_path):
    import columnformer.train as train

    calls = []
    monkeypatch.setattr(train, "keep_host_memory", lambda: calls.append(1) or True)
    for keep in (False, True):
        cfg = build_config({}, ["preset=digits", "model.sheet.width=16", "model.sheet.steps=1", "train.epochs=1",
                                "train.progress=false", f"out_dir={tmp_path}", f"name=keep-{keep}",
                                f"train.keep_host_memory={str(keep).lower()}"])
        trainer = train.Trainer(cfg, tmp_path / f"keep-{keep}")
        assert trainer.host_memory_kept is keep
    assert calls == [1]


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text.split("[")[1].split("]")[0] if "[" in text else "none"


def test_with_huge_pages_adds_the_tunable_once_and_keeps_others():
    from columnformer.runtime import HUGE_PAGES_TUNABLE, with_huge_pages

    env = with_huge_pages({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{HUGE_PAGES_TUNABLE}"
    assert with_huge_pages(env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
    assert with_huge_pages({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() != "madvise",
                    reason="needs glibc and transparent huge pages in madvise mode (where the tunable matters)")
def test_huge_pages_tunable_cuts_the_page_faults_of_large_tensors():
    """A child started with the tunable faults a fresh 64 MiB tensor in with far fewer (huge) pages."""
    import os

    from columnformer.runtime import with_huge_pages

    def probe(env):
        out = subprocess.run([sys.executable, "-c", PROBE, "default"], capture_output=True, text=True, check=True,
                             env=env).stdout
        return int(out.split()[1])

    plain = probe({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    huge = probe(with_huge_pages(os.environ))
    if huge * 4 > plain and tuple(map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])) < (2, 35):
        pytest.skip("glibc < 2.35 has no glibc.malloc.hugetlb tunable")
    assert plain >= 4096, plain  # 128 MiB in 4 KiB pages
    assert huge * 4 < plain, (huge, plain)
