"""torchrun training (issue 6): 2 CPU processes (gloo) give the same parameters as 1 process with the same
global batch — DDP and FSDP2 — rank 0 alone writes the run directory, and resume refuses another world size.

The digits training split has 1,257 images: with a global batch of 64 an epoch is 20 optimizer steps and
its last batch holds 41 images (21 on rank 0, 20 on rank 1), so the uneven last batch is covered.
Tolerance: atol 1e-5 on every parameter after 20 AdamW steps (measured differences are ~3e-7: float
summation order of the gradient all-reduce).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from columnformer.checkpoint import CheckpointError, load_checkpoint
from columnformer.config import build_config
from columnformer.train import resume, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.threads=1",
    "data.augment=true", "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.log_every=5",
    "train.ckpt_every=7",
]
ATOL = 1e-5
TIMING = {"samples_per_s", "train_time_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "columnformer", "train", *TINY, f"out_dir={out_dir}", f"name={name}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process reference run (in this process) and two 2-process torchrun runs (DDP, FSDP2), concurrently."""
    out = tmp_path_factory.mktemp("dist")
    procs = {"ddp": _torchrun(out, "ddp"), "fsdp": _torchrun(out, "fsdp", "train.parallel=fsdp")}
    train(build_config({}, [*TINY, f"out_dir={out}", "name=one"]))
    logs = {}
    for name, proc in procs.items():
        logs[name] = proc.communicate(timeout=420)[0]
        logs[name + "_rc"] = proc.returncode
    return out, logs


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _assert_same_run(one: Path, two: Path) -> None:
    a, b = load_checkpoint(one / "checkpoints" / "last.pt"), load_checkpoint(two / "checkpoints" / "last.pt")
    assert a["position"] == b["position"] and a["position"]["step"] == 20
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert b["model"][k].shape == v.shape and b["model"][k].dtype == v.dtype, k  # full, unsharded tensors
        torch.testing.assert_close(b["model"][k], v, atol=ATOL, rtol=0, msg=k)
    ma, mb = _metrics(one), _metrics(two)
    assert len(ma) == len(mb)  # also: rank 1 wrote no lines of its own
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (k, x, y)  # over both ranks' samples
            else:
                assert y[k] == x[k], (k, x, y)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (sa["steps"], sa["world_size"], sb["world_size"]) == (20, 1, 2)
    assert sb["test_acc"] == pytest.approx(sa["test_acc"], abs=0.02)
    # rank 0 alone writes: the same files as the single-process run, no leftovers from another writer
    assert _files(two) == _files(one)


def test_ddp_two_processes_equal_one_process(runs):
    out, logs = runs
    assert logs["ddp_rc"] == 0, logs["ddp"][-3000:]
    _assert_same_run(out / "one", out / "ddp")
    assert load_checkpoint(out / "ddp" / "checkpoints" / "last.pt")["world_size"] == 2


def test_fsdp2_two_cpu_processes_train_and_equal_one_process(runs):
    """FSDP2 (fully_shard) runs on CPU with gloo in this torch; its full-state checkpoint equals the 1-process run."""
    out, logs = runs
    assert logs["fsdp_rc"] == 0, logs["fsdp"][-3000:]
    _assert_same_run(out / "one", out / "fsdp")
    ck = load_checkpoint(out / "fsdp" / "checkpoints" / "last.pt")
    assert ck["parallel"] == "fsdp" and ck["world_size"] == 2
    assert "state" in ck["optimizer"] and "param_groups" in ck["optimizer"]


def test_resume_refuses_another_world_size(runs):
    out, logs = runs
    assert logs["ddp_rc"] == 0
    with pytest.raises(CheckpointError, match=r"2 process\(es\) but this run has 1.*--nproc_per_node=2"):
        resume(out / "ddp")


def test_loss_normalisation_of_the_partial_last_batch():
    """The valid-sample count of each rank's share of a global batch (the rest is the sampler's padding)."""
    from types import SimpleNamespace

    from columnformer.train import Trainer

    def valid(n, batch, world, rank, micro, local):
        fake = SimpleNamespace(sets={"train": range(n)}, cfg=SimpleNamespace(train=SimpleNamespace(batch_size=batch)),
                               dist=SimpleNamespace(world_size=world, rank=rank))
        return Trainer._valid_in_batch(fake, micro, local)

    assert valid(1257, 64, 2, 0, 19, 21) == (21, 41) and valid(1257, 64, 2, 1, 19, 21) == (20, 41)
    assert valid(1257, 64, 2, 1, 3, 32) == (32, 64)
    # 3 samples left over 4 ranks: rank 3 gets only padding (weight 0)
    assert [valid(67, 64, 4, r, 1, 1) for r in range(4)] == [(1, 3), (1, 3), (1, 3), (0, 3)]
    # and the sampler pads exactly at those positions
    from columnformer.data import EpochSampler

    for r in range(4):
        idx = EpochSampler(67, shuffle=False, rank=r, world_size=4).indices()
        assert len(idx) == 17 and (idx[-1] < 64) == (r == 3)  # rank 3's last index wrapped around: padding
