"""Issue 16 item 6: compare/report never reuse an analysis.json that no longer answers for the run."""

from __future__ import annotations

import json

from columnformer.checkpoint import load_checkpoint, save_checkpoint
from columnformer.cli import main
from columnformer.config import build_config
from columnformer.train import train

TINY = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.epochs=1",
        "train.max_steps=3", "train.threads=1", "train.progress=false", "train.figures=false"]
FAST = ["--max-batches", "1", "--no-init", "--no-figures", "--shuffles", "2"]


def _made_from(run):
    return json.loads((run / "analysis.json").read_text())["made_from"]


def test_compare_and_report_redo_a_stale_analysis(tmp_path, capsys):
    train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=s"]))
    run = tmp_path / "s"
    assert main(["analyze", str(run), *FAST]) == 0
    first = _made_from(run)
    assert first["split"] == "val" and first["checkpoint"] == "last" and len(first["sha256"]) == 64
    capsys.readouterr()
    assert main(["compare", str(run), *FAST]) == 0  # current: reused, no note
    assert "stale" not in capsys.readouterr().err and _made_from(run) == first

    # --split is honoured: the val analysis does not answer for the test split
    assert main(["compare", str(run), "--split", "test", *FAST]) == 0
    assert "made on the 'val' split" in capsys.readouterr().err and _made_from(run)["split"] == "test"

    # the run went on (its checkpoint file changed): report analyses again
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["model"]["head.fc.bias"] += 1.0
    save_checkpoint({k: v for k, v in state.items() if k != "schema_version"}, run / "checkpoints" / "last.pt")
    assert main(["report", str(run), "--split", "test", *FAST]) == 0
    assert "checkpoint last.pt changed" in capsys.readouterr().err
    assert _made_from(run)["sha256"] != first["sha256"]
