"""Predecessor parity: our presets compute clane9/columnformers' function, checked against its own outputs.

The fixtures in tests/fixtures/predecessor/ were written by make_fixtures.py with the predecessor's code at
the commit recorded in manifest.json (its state dicts, inputs, logits, attention maps, wiring cost, geometry).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from columnformer.checkpoint import load_pretrained
from columnformer.cli import main as cli_main
from columnformer.config import ConfigError
from columnformer.geometry import multilayer, stacked
from columnformer.predecessor import PredecessorImportError, import_predecessor, read_predecessor_checkpoint
from columnformer.factory import build_model
from columnformer.run import load_run

FIX = Path(__file__).parent / "fixtures" / "predecessor"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
SMALL = ["image_size=[8,8]", "in_chans=1", "patch=2", "num_classes=10"]

# fixture -> (preset of the same family, overrides giving the fixture's sizes)
CASES = {
    "ff": ("columnformer-ff-tiny", [*SMALL, "geometry.layers=[[4,4]]", "sheet.width=8", "sheet.steps=3",
                                    "sheet.qk_dim=4", "sheet.mlp_ratio=0.5"]),
    "rec": ("columnformer-rec-tiny", [*SMALL, "geometry.layers=[[4,4],[4,4],[4,4]]", "sheet.width=8",
                                      "sheet.steps=3", "sheet.qk_dim=4", "sheet.mlp_ratio=0.5"]),
    "rec_spatial": ("columnformer-rec-tiny", [*SMALL, "pool=spatial", "geometry.layers=[[4,4],[4,4]]",
                                              "sheet.width=8", "sheet.steps=2", "sheet.heads=2", "sheet.qk_dim=4",
                                              "sheet.value_proj=true", "sheet.mlp_ratio=1.0",
                                              "sheet.attn_residual=true", "sheet.time_embed=true"]),
    "vit": ("vit-tiny", [*SMALL, "geometry.layers=[[4,4]]", "sheet.width=12", "sheet.steps=2", "sheet.heads=2",
                         "sheet.qk_dim=6", "sheet.mlp_ratio=2.0"]),
    "tut": ("tut-tiny", [*SMALL, "geometry.layers=[[4,4],[4,4]]", "sheet.width=12", "sheet.steps=3", "sheet.heads=2",
                         "sheet.qk_dim=6", "sheet.experts=3"]),
    "moemixer": ("moemixer-tiny", [*SMALL, "geometry.layers=[[4,4]]", "sheet.width=12", "sheet.steps=3",
                                   "sheet.heads=2", "sheet.experts=[1,2,4]"]),
}


def _overrides(name: str) -> list[str]:
    return [f"model.{o}" for o in CASES[name][1]]


def _outputs(name: str) -> dict:
    return torch.load(FIX / f"{name}_outputs.pt", weights_only=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {name: import_predecessor(FIX / f"{name}_checkpoint.pt", root / name, preset, _overrides(name))
            for name, (preset, _) in CASES.items()}


def test_fixtures_were_made_by_the_recorded_upstream_commit():
    assert MANIFEST["commit"] == "5bfbd9da0b632775bf979c56b6143e0fc32d00f2"
    assert set(MANIFEST["models"]) == set(CASES)
    assert sum(p.stat().st_size for p in FIX.glob("*.pt")) < 600_000  # small fixtures (530 KiB for six models)


@pytest.mark.parametrize("name", list(CASES))
def test_imported_model_matches_the_predecessor_logits_attention_and_wiring(imported, name):
    out = _outputs(name)
    model = load_run(imported[name]).model
    with torch.no_grad():
        logits, trace = model(out["images"], record=("attn",))
    assert _rel(logits, out["logits"]) < 1e-5
    attn = torch.stack(trace.attn, dim=1)  # (B, T, H, N, N), the predecessor's state["attn"] layout
    if out["attn"].shape[0] == 1 < attn.shape[0]:  # static mixing: one map for the batch, ours repeats it per sample
        assert torch.equal(attn, attn[:1].expand_as(attn))
        attn = attn[:1]
    assert attn.shape == out["attn"].shape
    torch.testing.assert_close(attn, out["attn"], rtol=0, atol=1e-6)
    # the same wiring cost at the same lambda: its L1WiringCost(geometry, lambd=1) on its own maps
    assert abs(float(trace.wiring_cost) - float(out["wiring"])) <= 1e-5 * abs(float(out["wiring"]))


@pytest.mark.parametrize("name", ["ff", "rec", "rec_spatial", "vit"])
def test_geometry_and_bias_initialisation_follow_the_predecessor(name):
    preset, over = CASES[name]
    from columnformer.config import build_config

    cfg = build_config({"preset": preset}, [f"model.{o}" for o in over])
    model = build_model(cfg.model)
    out = _outputs(name)
    # its float32 torch.cdist (matmul form) carries ~1e-6 round-off; ours is computed in float64
    torch.testing.assert_close(model.sheet.connectivity.dist, out["geometry"], rtol=0, atol=2e-5)
    if "init_bias" in out:
        torch.testing.assert_close(model.sheet.blocks[0].attn.bias.detach(), out["init_bias"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("key,layers", [("single_8x8", [(8, 8)]), ("six_8x8", [(8, 8)] * 6)])
def test_full_size_preset_geometries_equal_the_predecessors(key, layers):
    ref = MANIFEST[f"geometry_{key}"]
    g = multilayer(layers, 2.0)
    d = g.distances(torch.float64)
    np.testing.assert_allclose(d[0].numpy(), ref["row0"], atol=2e-5)
    assert abs(g.mean_distance_power(1.0) - ref["mean"]) < 1e-5 * ref["mean"]  # the wiring normaliser
    preset = {"single_8x8": ["vit-tiny", "columnformer-ff-tiny"], "six_8x8": ["columnformer-rec-tiny"]}[key]
    for name in preset:
        sheet = build_model(name).sheet
        np.testing.assert_allclose(sheet.connectivity.dist[0].numpy(), ref["row0"], atol=2e-5)
        assert sheet.geometry.name.startswith("multilayer")


def test_multilayer_differs_from_stacked_as_the_issue_describes():
    # the predecessor's 8-wide layer is spaced 8/7 and a single layer has self-distance 2 (its depth offset)
    single = multilayer([(8, 8)], 2.0).distances()
    assert single[0, 0] == pytest.approx(2.0) and single[0, 1] == pytest.approx(float(np.hypot(8 / 7, 2.0)))
    assert stacked([(8, 8)]).distances()[0, 1] == pytest.approx(1.0)
    g = multilayer([(8, 8)], 2.0)
    assert g.pair_distances(np.array([0]), np.array([1]), along_sheet=True)[0] == pytest.approx(8 / 7)


def test_head_order_is_what_makes_the_logits_equal(imported):
    """With the library's own head order (LayerNorm after pooling) the same weights give other logits."""
    out = _outputs("rec")
    model = load_run(imported["rec"]).model
    model.head.norm_order = "pooled"
    with torch.no_grad():
        logits, _ = model(out["images"])
    assert _rel(logits, out["logits"]) > 1e-3


def test_checkpoint_formats_and_prefixes_are_read():
    sd, meta = read_predecessor_checkpoint(FIX / "rec_checkpoint.pt")  # training dict, DDP 'module.' keys
    assert meta == {"epoch": 7, "loss": 1.25} and all(not k.startswith("module.") for k in sd)
    sd, meta = read_predecessor_checkpoint(FIX / "vit_checkpoint.pt")  # torch.compile '_orig_mod.' keys
    assert meta["epoch"] == 3 and all(not k.startswith("_orig_mod.") for k in sd)
    sd, meta = read_predecessor_checkpoint(FIX / "ff_checkpoint.pt")  # a bare state dict
    assert meta == {} and "encoder.blocks.2.attn.q.weight" in sd


def test_imported_run_works_with_eval_init_from_and_records_provenance(imported, capsys):
    run = imported["rec"]
    assert cli_main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["acc"] <= 1.0 and result["n"] == 360 and result["checkpoint"] == "last"
    assert cli_main(["analyze", str(run), "--max-batches", "1", "--no-init", "--no-figures", "--shuffles", "2"]) == 0
    assert cli_main(["report", str(run)]) == 0
    assert (run / "analysis.json").is_file() and (run / "report.html").stat().st_size > 1000
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["predecessor"]["epoch"] == 7 and len(prov["predecessor"]["sha256"]) == 64
    # a fine-tuning run starts from exactly the imported weights
    from columnformer.config import build_config

    cfg = build_config({"preset": "columnformer-rec-tiny"}, _overrides("rec"))
    fresh = build_model(cfg.model)
    load_pretrained(fresh, run)
    ref = load_run(run).model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())


def test_cli_import_round_trip_and_bad_input_exit_codes(tmp_path, capsys):
    ck = str(FIX / "ff_checkpoint.pt")
    args = ["import-predecessor", ck, "--preset", "columnformer-ff-tiny", "--out", str(tmp_path / "ff")]
    assert cli_main([*args, *_overrides("ff")]) == 0
    assert json.loads(capsys.readouterr().out)["run"].endswith("ff")
    assert cli_main([*args, *_overrides("ff")]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite", *_overrides("ff")]) == 0
    capsys.readouterr()
    # the wrong family: the message names the first key that does not fit
    bad = ["import-predecessor", ck, "--preset", "vit-tiny", "--out", str(tmp_path / "x"), *_overrides("vit")]
    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert "encoder.blocks" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing written on failure


def test_size_mismatch_names_the_key_and_the_fix(tmp_path):
    over = [o for o in _overrides("rec") if "qk_dim" not in o] + ["model.sheet.qk_dim=8"]
    with pytest.raises(PredecessorImportError, match=r"encoder\.blocks\.0\.attn\.q\.weight.*KEY=VALUE"):
        import_predecessor(FIX / "rec_checkpoint.pt", tmp_path / "r", "columnformer-rec-tiny", over)


def test_geometry_mismatch_is_refused(tmp_path):
    over = [*_overrides("rec"), "model.geometry.kind=stacked"]  # unit spacing: not the predecessor's layout
    with pytest.raises(PredecessorImportError, match=r"encoder\.geometry.*multilayer"):
        import_predecessor(FIX / "rec_checkpoint.pt", tmp_path / "r", "columnformer-rec-tiny", over)


def test_unsupported_and_missing_keys_are_named(tmp_path):
    sd, _ = read_predecessor_checkpoint(FIX / "ff_checkpoint.pt")
    moe = {**sd, "encoder.blocks.0.attn.query": torch.zeros(1, 16, 8)}
    torch.save(moe, tmp_path / "moe.pt")
    with pytest.raises(PredecessorImportError, match=r"attn\.query.*selection attention"):
        import_predecessor(tmp_path / "moe.pt", tmp_path / "r", "columnformer-ff-tiny", _overrides("ff"))
    partial = {k: v for k, v in sd.items() if k != "encoder.blocks.1.mlp.fc2.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(PredecessorImportError, match=r"missing in the checkpoint sheet\.blocks\.1\.mlp\.fc2\.bias"):
        import_predecessor(tmp_path / "partial.pt", tmp_path / "r", "columnformer-ff-tiny", _overrides("ff"))


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    import argparse

    # an arbitrary object: loading it would run unpickling code outside the weights-only allow-list
    torch.save({"model": {"x": argparse.Namespace(cmd="rm -rf /")}}, tmp_path / "evil.pt")
    with pytest.raises(PredecessorImportError, match="not a loadable PyTorch checkpoint"):
        read_predecessor_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(PredecessorImportError, match="not a loadable"):
        read_predecessor_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(PredecessorImportError, match="does not exist"):
        read_predecessor_checkpoint(tmp_path / "missing.pt")


def test_import_refuses_the_library_head_order(tmp_path):
    with pytest.raises(ConfigError, match="head_norm"):
        import_predecessor(FIX / "ff_checkpoint.pt", tmp_path / "r", "columnformer-ff-tiny",
                           [*_overrides("ff"), "model.head_norm=pooled"])


def test_predecessor_code_is_not_vendored():
    """The generator imports the predecessor from a checkout; no file of this repository defines its classes."""
    root = Path(__file__).resolve().parents[1]
    hits = subprocess.run(
        [sys.executable, "-c", "import pathlib,sys; r=pathlib.Path(sys.argv[1]); print(sum('def multilayer_geometry' in p.read_text() "
         "for p in r.rglob('*.py') if '.venv' not in p.parts))", str(root / "src")],
        capture_output=True, text=True, check=True,
    )
    assert hits.stdout.strip() == "0"


def test_speed_benchmark_skips_cleanly_without_a_checkout_or_timm(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_predecessor.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("skipped: no predecessor checkout")
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "not a clane9/columnformers checkout" in out.stdout


@pytest.mark.parametrize("preset,upstream", [
    ("vit-tiny", "vision_transformer_tiny_patch16_128"), ("columnformer-ff-tiny", "vision_columnformer_ff_tiny_patch16_128"),
    ("columnformer-rec-tiny", "vision_columnformer_r_tiny_patch16_128"), ("tut-tiny", "vision_tut_tiny_patch16_128"),
    ("moemixer-tiny", "vision_moemixer_tiny_patch16_128"),
])
def test_full_size_presets_have_the_predecessors_parameter_counts(preset, upstream):
    """Counted by the predecessor's own constructors (make_fixtures.py writes them into manifest.json)."""
    from columnformer.factory import count_parameters

    assert count_parameters(build_model(preset)) == MANIFEST["param_counts"][upstream]
