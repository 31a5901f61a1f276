"""`columnformer sweep`: a tiny grid end to end through the CLI, grid-file errors, shipped grids."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from columnformer.cli import main
from columnformer.config import ConfigError
from columnformer.sweep import _mean_std, collect, load_grid, validate_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
        "train.max_steps=3", "train.progress=false", "train.device=cpu", "train.eval_batch_size=512"]


def _write_grid(tmp_path: Path, **over) -> Path:
    grid = {
        "name": "tiny",
        "base": str(ROOT / "configs" / "digits.yaml"),
        "seeds": [0, 1],
        "common": TINY,
        "configs": {
            "a": ["model.sheet.recurrent=true"],
            "b": {"overrides": ["model.sheet.recurrent=false", "model.sheet.time_embed=false"], "note": "feed-forward"},
        },
    }
    grid.update(over)
    grid = {k: v for k, v in grid.items() if v is not None}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_tiny_grid_end_to_end_through_cli(tmp_path):
    grid = _write_grid(tmp_path)
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "columnformer", "sweep", str(grid), "--parallel", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for run in ("a-s0", "a-s1", "b-s0", "b-s1"):
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["steps"] == 3
        # parallel > 1: each run is limited to cpus // 2 threads
        cfg = yaml.safe_load((out / run / "config.yaml").read_text())
        assert cfg["train"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert cfg["train"]["seed"] == int(run[-1])

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["config"] for r in rows] == ["a", "b"]
    for r in rows:
        accs = [json.loads((out / f"{r['config']}-s{s}" / "summary.json").read_text())["test_acc"] for s in (0, 1)]
        mean, std = _mean_std(accs)
        assert r["seeds"] == "2"
        assert float(r["test_acc_mean"]) == pytest.approx(mean)
        assert float(r["test_acc_std"]) == pytest.approx(std)
        assert int(r["num_params"]) > 0
    assert rows[1]["note"] == "feed-forward"

    md = (out / "results.md").read_text()
    assert "| config | params |" in md
    assert len(re.findall(r"\d+\.\d ± \d+\.\d", md)) >= 2  # accuracy mean ± std for each config
    assert "2/2" in md

    # resumable: a second call finds every summary.json and starts nothing
    mtime = (out / "a-s0" / "summary.json").stat().st_mtime
    assert main(["sweep", str(grid), "--out", str(out)]) == 0
    assert (out / "a-s0" / "summary.json").stat().st_mtime == mtime


def test_resume_reruns_only_missing(tmp_path, monkeypatch):
    from columnformer import sweep

    grid = load_grid(_write_grid(tmp_path, seeds=[0, 1, 2]), out_dir=tmp_path / "out")
    (tmp_path / "out" / "a-s1").mkdir(parents=True)
    (tmp_path / "out" / "a-s1" / "summary.json").write_text(json.dumps({"num_params": 1, "test_acc": 0.5}))
    started = []
    monkeypatch.setattr(sweep, "_run_one", lambda g, c, s, p, b: started.append(f"{c.name}-s{s}") or {"run": "x", "rc": 0, "seconds": 0})
    sweep.run_grid(grid, parallel=1, echo=lambda *_: None)
    assert sorted(started) == ["a-s0", "a-s2", "b-s0", "b-s1", "b-s2"]
    rows = collect(grid)
    assert rows[0]["seeds"] == 1 and rows[0]["test_acc_mean"] == 0.5


@pytest.mark.parametrize(
    "over, message",
    [
        ({"base": "nope/missing.yaml"}, "base config 'nope/missing.yaml' does not exist"),
        ({"bogus": 1}, "unknown key(s) 'bogus'"),
        ({"configs": None}, "missing required key 'configs'"),
        ({"configs": {}}, "'configs' must be a non-empty mapping"),
        ({"seeds": []}, "'seeds' must be a non-empty list of integers"),
        ({"seeds": [0, 0]}, "duplicates"),
        ({"common": "train.epochs=1"}, "must be a list of 'key=value' strings"),
        ({"common": ["train.epochs"]}, "is not of the form key=value"),
        ({"common": ["train.seed=3"]}, "sets a key the sweep sets per run"),
        ({"configs": {"bad name": []}}, "simple names"),
        ({"configs": {"a": {"overrides": [], "colour": "red"}}}, "unknown key(s) 'colour'"),
        ({"name": "a/b"}, "'name' must be a simple name"),
    ],
)
def test_bad_grid_files(tmp_path, over, message):
    with pytest.raises(ConfigError) as err:
        load_grid(_write_grid(tmp_path, **over))
    assert message in str(err.value)


def test_invalid_configs_are_all_reported_before_any_run(tmp_path):
    grid = _write_grid(tmp_path, configs={
        "ok": ["model.sheet.steps=1"],
        "typo": ["model.sheet.widht=8"],
        "badvalue": ["train.epochs=0"],
    })
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out)]) == 2  # config error exit code
    assert not out.exists()  # nothing started
    with pytest.raises(ConfigError) as err:
        validate_grid(load_grid(grid))
    msg = str(err.value)
    assert "typo" in msg and "unknown config key 'model.sheet.widht'" in msg
    assert "badvalue" in msg and "train.epochs" in msg
    assert "  ok" not in msg


def test_missing_grid_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "absent.yaml")
    p = tmp_path / "g.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_grid(p)


@pytest.mark.parametrize("name", ["digits.yaml", "imagenet100.yaml"])
def test_shipped_grids_validate(name):
    grid = load_grid(ROOT / "configs" / "ablation" / name)
    validate_grid(grid)  # builds every config (and model) of every seed
    assert len(grid.seeds) >= 3
    assert "tied" in grid.params
    names = {c.name for c in grid.configs}
    for required in ("tied", "untied_norm", "untied_attn", "untied_mlp", "untied_all", "untied_all_1head",
                     "untied_all_novp", "untied_all_bottleneck", "tied_wide"):
        assert required in names, required


def _children_with(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and "train" in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes")
def test_sigterm_stops_running_children(tmp_path):
    import signal
    import time

    out = tmp_path / "killed-sweep"
    grid = _write_grid(tmp_path, common=[*TINY[:-3], "train.max_steps=100000", "train.progress=false", "train.device=cpu"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "columnformer", "sweep", str(grid), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 60
    while not _children_with(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _children_with(str(out)), "the sweep never started a run"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _children_with(str(out)) == []
    assert not (out / "a-s1" / "config.yaml").exists()  # no further run was started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkill_of_the_sweep_ends_its_children(tmp_path):
    """A SIGKILLed sweep cannot run its handler; the kernel ends its children (PR_SET_PDEATHSIG)."""
    import signal
    import time

    out = tmp_path / "killed-9"
    grid = _write_grid(tmp_path, common=[*TINY[:-3], "train.max_steps=100000", "train.progress=false", "train.device=cpu"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "columnformer", "sweep", str(grid), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 60
    while not _children_with(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    children = _children_with(str(out))
    assert children, "the sweep never started a run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while _children_with(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert _children_with(str(out)) == []
