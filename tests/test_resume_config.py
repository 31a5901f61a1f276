"""Resume refuses an edited config.yaml that would change the run (issue 16, item 3)."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from columnformer.cli import main
from columnformer.config import RESUME_CLASSES, RunConfig, build_config, resume_class
from columnformer.tasks import TASK_CONFIGS
from columnformer.train import train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.epochs=2",
    "train.batch_size=128", "train.threads=1", "train.progress=false", "train.figures=false", "train.max_steps=3",
    "task.baseline=false",  # the logistic-regression reference is 3/4 of a tiny run's time; nothing here reads it
]


def _all_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            inner = [ann]
        if name == "task":
            inner = list(TASK_CONFIGS)
        if inner:
            for sub in inner:
                keys |= _all_keys(sub, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_config_key_is_classified_for_resume():
    """A key added later must be classified as safe or run-altering here, or this test fails."""
    keys = _all_keys(RunConfig)
    assert len(keys) > 60 and "task.mask_fraction" in keys and "model.sheet.width" in keys
    unclassified = sorted(k for k in keys if resume_class(k) is None)
    assert not unclassified, f"classify these keys in config.RESUME_CLASSES: {unclassified}"
    assert set(RESUME_CLASSES.values()) == {"safe", "alters"}
    assert resume_class("optim.lr") == "alters" and resume_class("data.num_workers") == "safe"
    assert resume_class("data.split_seed") == "alters" and resume_class("train.progress") == "safe"


@pytest.mark.parametrize(
    "edit, key",
    [("optim.lr", "optim.lr"), ("train.batch_size", "train.batch_size"), ("data.split_seed", "data.split_seed"),
     ("task.label_smoothing", "task.label_smoothing"), ("train.wiring_lambda", "train.wiring_lambda")],
)
def test_resume_refuses_a_run_altering_edit(tmp_path, capsys, edit, key):
    cfg = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=r"])
    train(cfg)
    values = {"optim.lr": 0.5, "train.batch_size": 64, "data.split_seed": 7, "task.label_smoothing": 0.2,
              "train.wiring_lambda": 0.3}
    edited = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=r", f"{edit}={values[edit]}"])
    from columnformer.run import write_config

    write_config(edited, tmp_path / "r" / "config.yaml")
    assert main(["resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "change the run" in err and key in err and "Traceback" not in err


def test_resume_accepts_safe_edits(tmp_path, capsys):
    summary = train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=s"]))
    assert "baseline" not in summary  # task.baseline=false skips the logistic-regression reference
    from columnformer.run import write_config

    edited = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=s", "train.log_every=1", "train.progress=true",
                               "data.num_workers=0", "train.threads=2"])
    write_config(edited, tmp_path / "s" / "config.yaml")
    assert main(["resume", str(tmp_path / "s")]) == 0


# ------------------------------------------------------------------ run names and --overwrite (issue 16, item 1)
@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", ".hidden", ""])
def test_run_names_stay_inside_out_dir(name):
    from columnformer.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'name'"):
        build_config({}, [*TINY, f"name={name}"])


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, capsys):
    args = ["train", *TINY, f"out_dir={tmp_path}", "name=o"]
    assert main(args) == 0
    run = tmp_path / "o"
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "keep.bin").write_bytes(b"mine too")
    (run / "robustness.json").write_text("{}")
    assert main([*args, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "keep.bin").read_bytes() == b"mine too"
    assert not (run / "robustness.json").exists()  # an output of the old run
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "last.pt").is_file()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    foreign = tmp_path / "data"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "precious.pt").write_bytes(b"not ours")
    assert main(["train", *TINY, f"out_dir={tmp_path}", "name=data", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a Columnformer run" in err and "Traceback" not in err
    assert (foreign / "checkpoints" / "precious.pt").read_bytes() == b"not ours"


# ------------------------------------------------------------------ run lock (issue 16, item 2)
def test_a_second_writer_is_refused_while_a_run_is_written(tmp_path, capsys):
    import os

    from columnformer.run import run_lock

    args = ["train", *TINY, f"out_dir={tmp_path}", "name=l"]
    with run_lock(tmp_path / "l"):  # another process writing this run
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "is in use by another process" in err and f"pid {os.getpid()}" in err and "Traceback" not in err
        assert not (tmp_path / "l" / "checkpoints").exists()
    assert main(args) == 0  # released: the run can be written
    with run_lock(tmp_path / "l"):
        assert main([*args, "--overwrite"]) == 1  # no overwrite under a writer's feet
        assert main(["resume", str(tmp_path / "l")]) == 1
        assert (tmp_path / "l" / "summary.json").is_file()
    assert main(["resume", str(tmp_path / "l")]) == 0


def test_a_killed_writer_leaves_no_stuck_lock(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from columnformer.run import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "k")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    from columnformer.run import RunLockedError, run_lock

    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        with run_lock(tmp_path / "k"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.05)
    with run_lock(tmp_path / "k"):  # the kernel released it with the process
        pass


# ------------------------------------------------------------------ wall time over resumed segments (issue 16, item 5)
def test_wall_time_counts_every_segment_and_survives_re_evaluation(tmp_path):
    from columnformer.checkpoint import load_checkpoint
    from columnformer.train import Trainer, resume

    cfg = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=w", "train.max_steps=8", "train.batch_size=64"])
    from columnformer.train import run_dir_for

    trainer = Trainer(cfg, run_dir_for(cfg))
    trainer.total_steps = 4  # stop the first segment after 4 of the run's 8 steps ...
    assert trainer.train_epoch() is False and trainer.step == 4
    trainer.total_steps, trainer.wall_before = 8, 1000.0  # ... as if it had taken 1000 s
    trainer.save("last")
    assert load_checkpoint(tmp_path / "w" / "checkpoints" / "last.pt")["wall_time"] >= 1000.0
    done = resume(tmp_path / "w")  # the second segment trains steps 5-8
    assert done["steps"] == 8 and done["wall_time_s"] >= 1000.0  # earlier segments count
    again = resume(tmp_path / "w")  # a finished run: re-evaluated, its wall time kept (not 0, not grown)
    assert again["wall_time_s"] == pytest.approx(done["wall_time_s"], abs=0.5)


def test_resume_extend_trains_a_finished_run_further(tmp_path, capsys):
    base = [x for x in TINY if not x.startswith("train.max_steps")]
    assert main(["train", *base, f"out_dir={tmp_path}", "name=e"]) == 0  # 2 epochs of 10 steps
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "e"), "--extend", "2"]) == 2
    assert "must exceed" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "e"), "--extend", "3"]) == 0
    import json

    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x
              and json.loads(x)["type"] == "epoch"]
    assert summary["steps"] == 30 and summary["epochs"] == 3 and epochs == [1, 2, 3]
    assert "epochs: 3" in (tmp_path / "e" / "config.yaml").read_text()
    assert main(["resume", str(tmp_path / "e")]) == 0  # checkpoint and config.yaml agree again


# ------------------------------------------------------------------ divergence (issue 16, item 4)
def test_a_diverging_run_keeps_only_finite_checkpoints_and_says_which(tmp_path, capsys):
    import json

    import torch

    from columnformer.checkpoint import load_checkpoint

    args = ["train", *[x for x in TINY if not x.startswith("train.max_steps")], f"out_dir={tmp_path}", "name=d",
            "train.batch_size=64", "train.ckpt_every=1", "optim.lr=1e6", "optim.grad_clip=null", "optim.warmup_frac=0"]
    assert main(args) == 3
    err = capsys.readouterr().err
    last = tmp_path / "d" / "checkpoints" / "last.pt"
    if last.exists():
        step = load_checkpoint(last)["position"]["step"]
        assert f"last good checkpoint is {last} (step {step})" in err
        assert all(torch.isfinite(v).all() for v in load_checkpoint(last)["model"].values() if v.is_floating_point())
        assert main(["eval", str(tmp_path / "d")]) == 0
        out = json.loads(capsys.readouterr().out)  # valid JSON, finite numbers
        assert all(v is None or v == v for v in out.values())
    else:
        assert "no checkpoint was written before it diverged" in err


def test_load_run_refuses_non_finite_weights(tmp_path, capsys):
    import torch

    from columnformer.checkpoint import load_checkpoint, save_checkpoint

    train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=n"]))
    path = tmp_path / "n" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["model"]["sheet.pos_embed"][0, 0] = float("nan")
    save_checkpoint({k: v for k, v in state.items() if k != "schema_version"}, path)
    for cmd in (["eval", str(tmp_path / "n")], ["analyze", str(tmp_path / "n")], ["probe", str(tmp_path / "n")]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert "non-finite weights" in err and "sheet.pos_embed" in err and "Traceback" not in err


# ------------------------------------------------------------------ half-written files (issue 16, item 5)
def test_half_written_files_and_a_kill_before_the_first_checkpoint(tmp_path, capsys):
    import json

    from columnformer.run import load_run

    args = ["train", *TINY, f"out_dir={tmp_path}", "name=h"]
    assert main(args) == 0
    run = tmp_path / "h"
    whole = json.loads((run / "summary.json").read_text())
    log = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(log + '{"type": "step", "st')  # killed while writing a line
    assert len(load_run(run).metrics) == len(log.splitlines())
    (run / "summary.json").write_text('{"name": "h", "te')
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json is damaged" in err and "Traceback" not in err
    (run / "checkpoints" / ".last.pt.zzz.tmp").write_bytes(b"orphan of a killed write")
    assert main(["resume", str(run)]) == 0  # as the message says: re-evaluates and writes summary.json again
    assert json.loads((run / "summary.json").read_text())["test_acc"] == whole["test_acc"]
    assert not list((run / "checkpoints").glob(".*.tmp"))  # orphaned temp files are cleaned

    # a run killed during its first checkpoint write: config.yaml, a temp file, no last.pt
    fresh = tmp_path / "f"
    assert main(["train", *TINY, f"out_dir={tmp_path}", "name=f", "train.max_steps=1"]) == 0
    for p in (fresh / "checkpoints").iterdir():
        p.unlink()
    (fresh / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (fresh / "summary.json").unlink()
    assert main(["resume", str(fresh)]) == 0  # starts it again instead of failing
    assert "starting it from the beginning" in capsys.readouterr().err
    assert not list((fresh / "checkpoints").glob(".*.tmp"))
    again = json.loads((fresh / "summary.json").read_text())
    assert again["steps"] == 1 and (fresh / "checkpoints" / "last.pt").is_file()
    assert whole["steps"] == 3


# ------------------------------------------------------------------ clear messages instead of tracebacks (issue 16, item 7)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.mean=[0.5]", "data.std=[.inf]"], "data.std must be positive and finite"),
        (["data.mean=[.nan]", "data.std=[1]"], "data.mean must be finite"),
        (["model.connectivity.kind=local", "model.connectivity.k=500"], "k=500 edges per column exceed the sheet's 48 columns"),
        (["model.connectivity.kind=local_long_range", "model.connectivity.k=40", "model.connectivity.k_long=10"],
         "k=40 \\+ k_long=10 edges per column exceed"),
    ],
)
def test_impossible_values_are_config_errors(overrides, message, capsys):
    assert main(["train", "preset=digits", *overrides, "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err) and "Traceback" not in err and "{'model'" not in err
