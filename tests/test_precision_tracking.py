"""Precision (bf16 autocast on CPU, fp16 guarded), torch.compile wiring, and trackers (TensorBoard, W&B offline)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from columnformer.checkpoint import load_checkpoint
from columnformer.cli import main
from columnformer.config import ConfigError, build_config
from columnformer.train import Trainer, train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.threads=1",
    "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.log_every=2", "train.max_steps=4",
]


def tiny(tmp_path, *extra):
    return build_config({}, [*TINY, f"out_dir={tmp_path}", *extra])


def test_bf16_autocast_on_cpu_trains_with_fp32_params(tmp_path):
    summary = train(tiny(tmp_path, "name=bf16", "train.precision=bf16", "train.device=cpu"))
    assert summary["steps"] == 4 and summary["precision"] == "bf16" and math.isfinite(summary["test_loss"])
    steps = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert steps and all(math.isfinite(m["loss"]) for m in steps if m["type"] == "step")
    state = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard; skipped where CUDA is available")
def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        tiny(tmp_path, "train.precision=fp16", "train.device=cpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*bf16 on CPU"):
        Trainer(tiny(tmp_path, "name=fp16", "train.precision=fp16"), tmp_path / "fp16")  # device=auto -> cpu


def test_compile_switch_wraps_the_training_module(tmp_path, monkeypatch):
    """train.compile=true goes through torch.compile (eager backend here: the wiring, not inductor's C++ build)."""
    calls = []
    real = torch.compile

    def spy(module, **kw):
        calls.append(type(module).__name__)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    summary = train(tiny(tmp_path, "name=compiled", "train.compile=true", "train.max_steps=2"))
    assert calls == ["VisionColumnformer"] and summary["steps"] == 2


def _has(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


@pytest.mark.skipif(not (_has("tensorboard") and _has("wandb")), reason="tracking extra not installed (pip install 'columnformer[tracking]')")
def test_tensorboard_and_wandb_offline_write_files(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny(tmp_path, "name=tracked", "train.tracking=[tensorboard,wandb]"))
    run_dir = tmp_path / "tracked"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "step/loss" in tags and "summary/test_acc" in tags  # (max_steps stops before the first epoch record)
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("run-*.wandb")), sorted(p.name for p in (run_dir / "wandb").iterdir())
    assert (run_dir / "wandb_id.txt").read_text().strip()
    assert (run_dir / "metrics.jsonl").read_text().count('"type": "step"') == 2  # metrics.jsonl always


def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    code = main(["train", *TINY, f"out_dir={tmp_path}", "name=nowandb", "train.tracking=[wandb]"])
    err = capsys.readouterr().err
    assert code == 1 and "wandb package is not installed" in err and "pip install 'columnformer[tracking]'" in err
    assert not (tmp_path / "nowandb" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="train.tracking"):
        build_config({}, ["train.tracking=[mlflow]"])


@pytest.mark.skipif(not _has("wandb"), reason="wandb not installed")
def test_wandb_falls_back_to_offline_when_online_init_fails(tmp_path, monkeypatch):
    import wandb

    from columnformer.tracking import WandbTracker

    modes = []

    class FakeRun:
        id = "abc123"

    def fake_init(mode=None, **kw):
        modes.append(mode)
        if mode == "online":
            raise ConnectionError("no route to api.wandb.ai")
        return FakeRun()

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # looks configured, but the network is down
    monkeypatch.setattr(wandb, "init", fake_init)
    WandbTracker(tiny(tmp_path), tmp_path)
    assert modes == ["online", "offline"] and (tmp_path / "wandb_id.txt").read_text() == "abc123"
