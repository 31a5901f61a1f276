"""train.keep_host_memory: freed host memory stays in the process (no fresh page faults for the next tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from columnformer.config import build_config

PROBE = r"""
import resource, sys, torch
from columnformer.runtime import keep_host_memory
kept = keep_host_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):  # as each training step: two 64 MiB tensors allocated, written and freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(16 << 20)
    y.fill_(1.0)
    z = y * 2.0
    del y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(kept, min(faults[-3:]), max(faults[-3:]))
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    kept, low, high = out.split()
    return kept == "True", int(low), int(high)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
def test_kept_host_memory_is_reused_without_page_faults():
    kept, _, faults = _probe("keep")
    assert kept
    # after the first steps (glibc's aligned allocations leave some gaps) the 128 MiB are reused: no fresh pages
    assert faults < 256, faults
    default_kept, default_faults, _ = _probe("default")
    assert not default_kept
    # glibc's default unmaps the blocks on free: every step faults 32,768 pages of 4 KiB in again (64 huge pages
    # where transparent huge pages are forced on for every mapping)
    assert default_faults >= 64, default_faults


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
