"""`analyze` end to end on tiny trained runs: grid, stacked, sphere and sparse sheets; CLI and compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from columnformer.analysis.analyze import AnalysisOptions, analyze_run

_RUNS: dict[str, Path] = {}
_KINDS = {
    "grid": ["model.geometry.kind=grid", "model.geometry.shape=[4,4]"],
    "stacked": ["preset=digits"],
    "sphere": ["model.geometry.kind=sphere", "model.geometry.n=16", "model.output_area=all"],
    "sparse": [
        "model.geometry.kind=stacked", "model.geometry.layers=[[4,4],[6,5]]",
        "model.connectivity.kind=local", "model.connectivity.k=8",
    ],
}
QUICK = AnalysisOptions(max_batches=1, batch_size=64, n_shuffles=5, n_random=1)


def tiny_run(tmp_path_factory, kind: str) -> Path:
    """A tiny trained run (5 optimizer steps), shared by the analysis and report tests of one session."""
    if kind not in _RUNS:
        from columnformer.config import build_config
        from columnformer.train import train

        root = tmp_path_factory.getbasetemp() / "analysis_runs"
        cfg = build_config({}, [
            *_KINDS[kind], "model.sheet.width=16", "model.sheet.steps=2", "train.max_steps=5", "train.epochs=1",
            "train.batch_size=32", "train.eval_batch_size=256", "train.log_every=2", "train.progress=false", f"name={kind}", f"out_dir={root}",
        ])
        train(cfg)
        _RUNS[kind] = root / kind
    return _RUNS[kind]


@pytest.mark.parametrize("kind", ["grid", "stacked", "sphere", "sparse"])
def test_analyze_end_to_end(tmp_path_factory, kind):
    run = tiny_run(tmp_path_factory, kind)
    res = analyze_run(run, QUICK, quiet=True)
    on_disk = json.loads((run / "analysis.json").read_text())
    assert on_disk["headline"] == res["headline"]
    n = res["model"]["columns"]
    conn = res["trained"]["connectivity"]
    assert conn["kind"] == ("sparse" if kind == "sparse" else "dense")
    assert 0 <= conn["locality"]["mean"] <= 1
    assert conn["wiring_length"]["mean"] > 0
    prof = np.array(conn["attention_vs_distance"]["mass"], dtype=float)
    np.testing.assert_allclose(np.nansum(prof, axis=1), 1.0, rtol=1e-4)
    assert ("layer_flow" in conn) == (kind in ("stacked", "sparse"))
    if "layer_flow" in conn:
        lf = conn["layer_flow"]
        total = np.array(lf["feedforward"]) + np.array(lf["lateral"]) + np.array(lf["feedback"])
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    g = conn["graph"]
    assert g["nodes"] == n and g["directed_edges"] == 4 * n
    topo = res["trained"]["topography"]
    assert np.array(topo["dprime"]["per_class_per_column"]).shape == (10, n)
    assert topo["smoothness"]["pairs"]["pairs"] > 0
    assert topo["weight_similarity"] is not None  # untied sheets
    assert "init" in res and res["init"]["connectivity"]["steps"] == 2
    top = res["top_incoming"]
    src, w = np.array(top["src"]), np.array(top["weight"])
    assert src.shape == w.shape == (2, n, min(16, 8 if kind == "sparse" else n))
    assert (np.diff(w, axis=-1) <= 1e-7).all()  # strongest first
    if kind == "sparse":  # top sources are real edges of the sparse connectivity
        from columnformer.run import load_run

        idx = load_run(run).model.sheet.edge_index.numpy()
        for i in range(n):
            assert set(src[0, i][src[0, i] >= 0]) <= set(idx[i])
    figs = set(res["figures"])
    assert {"attention_vs_distance.png", "sheet_maps.png", "smoothness.png"} <= figs
    assert ("layer_flow.png" in figs) == ("layer_flow" in conn)
    for f in figs:
        assert (run / "figures" / "analysis" / f).stat().st_size > 1000
    arrays = np.load(run / "analysis_arrays.npz")
    np.testing.assert_array_equal(arrays["top_src"], src)


def test_init_model_matches_training_start(tmp_path_factory):
    """The 'init' model is the trainer's model before the first step (same seed and build order)."""
    import torch

    from columnformer.analysis.analyze import init_model
    from columnformer.run import read_run_config
    from columnformer.train import Trainer

    run = tiny_run(tmp_path_factory, "grid")
    cfg = read_run_config(run)
    a = init_model(cfg)
    trainer = Trainer(cfg, tmp_path_factory.mktemp("init_check") / "r")
    for (k, p), (k2, p2) in zip(a.state_dict().items(), trainer.model.state_dict().items()):
        assert k == k2 and torch.equal(p, p2), k


def test_cli_analyze_and_compare(tmp_path_factory, capsys):
    from columnformer.cli import main

    a, b = tiny_run(tmp_path_factory, "grid"), tiny_run(tmp_path_factory, "sparse")
    assert main(["analyze", str(a), "--max-batches", "1", "--shuffles", "3", "--no-figures", "--no-init"]) == 0
    out = capsys.readouterr().out
    assert "locality" in out and "analysis.json" in out
    data = json.loads((a / "analysis.json").read_text())
    assert "init" not in data and data["options"]["n_shuffles"] == 3
    (b / "analysis.json").unlink(missing_ok=True)  # compare analyses runs that lack analysis.json
    assert main(["compare", str(a), str(b), "--max-batches", "1", "--shuffles", "2", "--no-figures"]) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert "locality" in lines[0] and "modularity" in lines[0] and "params" in lines[0]
    assert lines[2].startswith("grid") and lines[3].startswith("sparse")
    assert (b / "analysis.json").exists()
    assert main(["compare", str(a), str(b), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["conn"] == "local" and rows[0]["weights"] == "untied"


def test_cli_radius_option_takes_effect(tmp_path_factory):
    """`analyze --radius` reaches the locality index: a wider radius holds at least as much mass, and more here."""
    from columnformer.cli import main

    run = tiny_run(tmp_path_factory, "grid")
    loc = {}
    for r in (1.0, 2.5):
        assert main(["analyze", str(run), "--radius", str(r), "--max-batches", "1", "--shuffles", "2",
                     "--no-figures", "--no-init"]) == 0
        conn = json.loads((run / "analysis.json").read_text())["trained"]["connectivity"]
        assert conn["locality"]["radius"] == r
        loc[r] = conn["locality"]["mean"]
    assert 0 < loc[1.0] < loc[2.5] < 1  # a 4x4 grid: radius 1 holds 5 columns, 2.5 holds up to 21
