"""Bad input and missing extras end in one clear line that names the problem and the fix (issue 16 item 7):
a missing optional package, a config section given as a scalar, a geometry that does not fit the input
(reported before any data is loaded), and a one-class training set (warned, not a silent 100 %)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from columnformer import cli

SMALL = ["model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.figures=false"]


def test_missing_hf_extra_names_the_extra(monkeypatch, tmp_path, capsys):
    """`data.name=hf` without the datasets package: exit 1 and the pip command, no traceback."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "d").mkdir()
    code = cli.main(["train", "data.name=hf", f"data.path={tmp_path / 'd'}", f"out_dir={tmp_path}", *SMALL])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "data.name=hf" in err and "pip install 'columnformer[hf]'" in err


def test_scalar_section_blames_the_file_not_the_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: 5\n")
    assert cli.main(["train", "--config", str(cfg), "data.name=digits"]) == 2
    err = capsys.readouterr().err
    assert "the config file" in err and "sets 'data' to 5" in err and "mapping" in err
    cfg.write_text("model:\n  sheet: 3\n")
    assert cli.main(["train", "--config", str(cfg), "model.sheet.steps=2"]) == 2
    assert "sets 'model.sheet' to 3" in capsys.readouterr().err
    # an earlier override is blamed when it is the one that made the scalar
    assert cli.main(["train", "data=3", "data.name=digits"]) == 2
    assert "the override 'data=3' sets 'data' to 3" in capsys.readouterr().err


def test_geometry_mismatch_reported_before_the_data_is_loaded(tmp_path, capsys):
    """The data path does not exist: if the data were loaded first, the error would be about the path."""
    code = cli.main([
        "train", "data.name=folder", f"data.path={tmp_path / 'no_such_folder'}", "model.geometry.kind=sphere",
        f"out_dir={tmp_path}", *SMALL,
    ])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "patches" in err and "geometry" in err and "no_such_folder" not in err


def test_one_class_training_set_is_warned(tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image

    root = tmp_path / "one"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        (root / split / "cat").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / split / "cat" / f"{i}.png")
    code = cli.main([
        "train", "data.name=folder", f"data.path={root}", "data.mean=[0.5]", "data.std=[0.25]", "model.num_classes=1",
        "train.epochs=1", "train.batch_size=4", f"out_dir={tmp_path / 'runs'}", "name=one", *SMALL,
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: the training split holds a single class ('cat')" in err
