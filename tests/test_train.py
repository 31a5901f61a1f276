"""Training loop, CLI and checkpoints (issue 3): end to end, errors, determinism, kill-and-resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from columnformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from columnformer.cli import main
from columnformer.config import ConfigError, build_config
from columnformer.run import load_run
from columnformer.train import Trainer, TrainingDiverged, param_groups, resume, train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
    "train.epochs=2", "train.batch_size=64", "train.threads=1", "train.progress=false",
    "train.log_every=5", "train.ckpt_every=4",
]
TIMING_KEYS = {"samples_per_s", "train_time_s"}


def tiny_cfg(tmp_path: Path, *extra: str):
    return build_config({}, [*TINY, f"out_dir={tmp_path}", *extra])


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)
            else:
                assert x[k] == y[k], (k, x, y)


# ------------------------------------------------------------------ end to end
def test_cli_end_to_end(tmp_path, capsys):
    assert main(["train", *TINY, f"out_dir={tmp_path}", "name=e2e"]) == 0
    run_dir = tmp_path / "e2e"
    for rel in ("config.yaml", "provenance.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                "checkpoints/best.pt", "figures/learning_curves.png", "figures/attention_vs_distance.png"):
        assert (run_dir / rel).is_file(), rel
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 * 20  # ceil(1257 training images / 64) steps per epoch, 2 epochs
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["num_params"] > 0
    assert summary["baseline"]["logreg_test_acc"] > 0.9
    metrics = _metrics(run_dir)
    assert [m["epoch"] for m in metrics if m["type"] == "epoch"] == [1, 2]
    assert all("wiring_cost" in m and "task_loss" in m for m in metrics if m["type"] == "step")
    times = [json.loads(x)["train_time_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"epoch", "epoch"' in x]
    assert len(times) == 2 and 0 < times[0] < times[1] <= summary["train_time_s"] + 1e-9  # accuracy-vs-time curves
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert {"git_commit", "git_dirty", "packages", "hardware", "command", "config_schema_version",
            "checkpoint_schema_version"} <= prov.keys()
    from importlib import metadata

    assert prov["packages"]["torch"] == metadata.version("torch") and prov["packages"]["numpy"] == metadata.version("numpy")
    assert prov["command"][1:] == sys.argv[1:] and prov["hardware"]["cpu_count"] == os.cpu_count()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(load_run.__code__.co_filename).parent, capture_output=True, text=True)
    assert prov["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["acc"] == pytest.approx(summary["test_acc"])

    run = load_run(run_dir)
    assert run.config.name == "e2e" and len(run.metrics) == len(metrics) and run.summary["steps"] == summary["steps"]
    logits, trace = run.model(torch.zeros(3, 1, 8, 8))
    assert logits.shape == (3, 10) and len(trace.wiring) == 2

    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "digits" in listing and "38,943,460" in listing


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    args = ["train", *TINY, f"out_dir={tmp_path}", "name=again", "train.max_steps=2"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epohcs=3", "unknown config key 'train.epohcs'; allowed keys here: epochs"),
        ("train.epochs=three", "config key 'train.epochs': Input should be a valid integer"),
        ("model.pool=max", "config key 'model.pool': Input should be 'avg' or 'spatial'"),
        ("train.epochs=0", "config key 'train.epochs': Input should be greater than or equal to 1"),
        ("model.sheet.heads=3", "width=64 must be divisible by heads=3"),
        ("preset=nope", "unknown preset 'nope'; available presets: digits"),
        ("nokey", "is not of the form key=value"),
    ],
)
def test_config_errors_are_clear(tmp_path, capsys, override, message):
    code = main(["train", "preset=digits", f"out_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not any(tmp_path.iterdir()), "no work may start before the config is valid"


def test_missing_config_file(capsys):
    assert main(["train", "--config", "does/not/exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ optimisation details
def test_no_weight_decay_on_biases_norms_embeddings(tmp_path):
    from columnformer import build_model

    model = build_model("digits")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "sheet.pos_embed" in no_decay_names and "sheet.blocks.0.attn.bias" in no_decay_names
    assert "sheet.blocks.0.norm1.weight" in no_decay_names and "sheet.blocks.0.mlp.fc1.bias" in no_decay_names
    assert "sheet.blocks.0.attn.q.weight" in decay_names and "embed.proj.weight" in decay_names
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """2 micro-batches of 32 with accumulation == 1 batch of 64 (same samples, same update)."""
    base = ["train.max_steps=3", "data.augment=false", "optim.warmup_frac=0"]
    a = Trainer(tiny_cfg(tmp_path, "name=a", *base), tmp_path / "a")
    b = Trainer(tiny_cfg(tmp_path, "name=b", "train.batch_size=32", "optim.accum_steps=2", *base), tmp_path / "b")
    # same sample order: b's sampler yields the same permutation, consumed in halves
    a.train_epoch()
    b.train_epoch()
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=2e-6, rtol=1e-4), n


def test_determinism_same_seed_same_metrics(tmp_path):
    s1 = train(tiny_cfg(tmp_path, "name=d1"))
    s2 = train(tiny_cfg(tmp_path, "name=d2"))
    _assert_same_metrics(_metrics(tmp_path / "d1"), _metrics(tmp_path / "d2"))
    assert s1["test_acc"] == s2["test_acc"] and s1["test_loss"] == pytest.approx(s2["test_loss"], rel=1e-6)
    s3 = train(tiny_cfg(tmp_path, "name=d3", "train.seed=1"))
    assert _metrics(tmp_path / "d3") != _metrics(tmp_path / "d1")
    assert s3["num_params"] == s1["num_params"]


# ------------------------------------------------------------------ failures
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "name=nan", "train.ckpt_every=2")
    trainer = Trainer(cfg, tmp_path / "nan")
    forward = trainer.train_module.forward
    calls = {"n": 0}

    def poisoned(images, record=()):
        calls["n"] += 1
        logits, trace = forward(images, record)
        return (logits * float("nan") if calls["n"] > 5 else logits), trace

    trainer.train_module.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* at step 5.*last good checkpoint is .*last.pt \(step 4\)"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert state["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path, capsys):
    assert main(["train", *TINY, f"out_dir={tmp_path}", "name=c", "train.max_steps=4"]) == 0
    last = tmp_path / "c" / "checkpoints" / "last.pt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])  # truncated, as a crash of a non-atomic writer would leave it
    assert main(["resume", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "is corrupt or not a Columnformer checkpoint" in err and "Traceback" not in err
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(last)
    last.write_bytes(good)
    cfg_file = tmp_path / "c" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("width: 16", "width: 32"))
    assert main(["resume", str(tmp_path / "c")]) == 2
    assert "differs from the config checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"], "no temp file may be left behind"


# ------------------------------------------------------------------ kill and resume
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "columnformer", *args]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    common = [*TINY, f"out_dir={tmp_path}", "train.epochs=3", "train.ckpt_every=1", "train.log_every=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli("train", *common, "name=whole"), check=True, env=env, capture_output=True, timeout=300)
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())

    rng = random.Random(1234)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *common, "name=killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kills = 0
    for attempt in range(12):
        # wait until the run has written its first checkpoint, then kill at a random moment
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = subprocess.Popen(_cli("resume", str(run_dir)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 0
    assert kills >= 2, "the run finished before it could be killed twice; the test lost its point"
    resumed = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "epochs", "best_val_acc", "test_acc", "best_val_test_acc"):
        assert resumed[key] == reference[key], key
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
    _assert_same_metrics(_metrics(run_dir), _metrics(tmp_path / "whole"))
    final_a = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    final_b = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    for k in final_b:
        assert torch.allclose(final_a[k], final_b[k], atol=1e-6), k


def test_resume_of_finished_run_only_re_evaluates(tmp_path):
    summary = train(tiny_cfg(tmp_path, "name=done", "train.max_steps=6"))
    again = resume(tmp_path / "done")
    assert again["steps"] == summary["steps"] and again["test_acc"] == summary["test_acc"]


def test_label_smoothing_changes_only_the_training_loss(tmp_path):
    plain = Trainer(tiny_cfg(tmp_path, "name=ls0", "train.max_steps=1", "train.log_every=1"), tmp_path / "ls0")
    smooth = Trainer(
        tiny_cfg(tmp_path, "name=ls1", "train.max_steps=1", "train.log_every=1", "train.label_smoothing=0.3"),
        tmp_path / "ls1",
    )
    plain.train_epoch()
    smooth.train_epoch()
    a, b = plain.metrics.read()[0], smooth.metrics.read()[0]
    assert a["acc"] == b["acc"]  # same first batch, same initial model
    assert b["task_loss"] != pytest.approx(a["task_loss"], rel=1e-3)


def test_rewiring_during_training_is_logged_and_changes_edges(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "name=rw", "train.max_steps=6", "model.connectivity.kind=local", "model.connectivity.k=12",
        "train.rewire.every=3", "train.rewire.fraction=0.25",
    )
    trainer = Trainer(cfg, tmp_path / "rw")
    before = trainer.model.sheet.edge_index.clone()
    trainer.fit()
    records = [m for m in trainer.metrics.read() if m["type"] == "rewire"]
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["edges_replaced"] > 0 for r in records)
    after = trainer.model.sheet.edge_index
    assert after.shape == before.shape and (after != before).any()
    assert trainer.model.sheet.edge_mask.all()
    # the rewired edges are part of the checkpoint, so a loaded run has the trained wiring
    assert torch.equal(load_run(tmp_path / "rw").model.sheet.edge_index, after)


def test_rewire_needs_a_sparse_sheet():
    with pytest.raises(ConfigError, match="train.rewire.every needs a sparse sheet"):
        build_config({}, ["preset=digits", "train.rewire.every=10"])


class _Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def test_in_process_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """K steps, checkpoint, 'kill', resume in a process whose RNG is elsewhere = one uninterrupted run: weights,
    every metrics line (loss, learning rate, grad norm), the summary and the final torch RNG state. Fails with the
    scheduler restore skipped. (Training draws nothing from the global RNG, data loaders included, so the final
    state also shows that a resume leaves the stream where an uninterrupted run leaves it.)"""
    import random

    import numpy as np

    from columnformer.train import Trainer

    common = ["train.epochs=3", "train.ckpt_every=7", "train.log_every=1", "train.figures=false"]
    reference = train(tiny_cfg(tmp_path, *common, "name=whole"))
    rng_after_whole = torch.get_rng_state().clone()

    save = Trainer.save

    def save_then_die(self, name):
        save(self, name)
        if name == "last" and self.step == 14:  # mid-epoch (an epoch has 20 steps)
            raise _Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Killed):
        train(tiny_cfg(tmp_path, *common, "name=cut"))
    monkeypatch.setattr(Trainer, "save", save)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["position"]["step"] == 14
    torch.manual_seed(987), np.random.seed(987), random.seed(987)  # a new process starts from other RNG states
    resumed = resume(tmp_path / "cut")
    assert torch.equal(torch.get_rng_state(), rng_after_whole)
    for key in ("steps", "epochs", "best_val_acc", "test_acc"):
        assert resumed[key] == reference[key], key
    _assert_same_metrics(_metrics(tmp_path / "cut"), _metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    for k in b:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
