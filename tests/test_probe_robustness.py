"""Label-efficiency tools and robustness (issue 10): labelled subsets, init_from, probe, corruptions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from columnformer.checkpoint import CheckpointError, load_checkpoint
from columnformer.cli import main
from columnformer.config import build_config
from columnformer.data import build_datasets
from columnformer.robustness import (
    CORRUPTIONS, accuracy_table, accuracy_tables, corrupt, corrupted_split, corruption_error, logreg_predictor, model_predictor,
)
from columnformer.train import Trainer, train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.threads=1",
    "train.progress=false", "train.log_every=5", "train.batch_size=128", "train.epochs=1", "train.figures=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MIM run, a classifier fine-tuned from it on 10% of the labels, and a tiny ViT classifier."""
    out = tmp_path_factory.mktemp("runs")
    train(build_config({}, [*TINY, f"out_dir={out}", "name=mim", "task=mim", "task.decoder_hidden=16"]))
    ft = ["data.labels_fraction=0.1", "data.labels_holdout=0.2", "train.batch_size=32", "train.epochs=2"]
    train(build_config({}, [*TINY, *ft, f"out_dir={out}", "name=ft", f"init_from={out / 'mim'}"]))
    train(build_config({}, [*TINY, f"out_dir={out}", "name=vit", "preset=digits-vit", "model.sheet.width=16",
                            "model.sheet.heads=2", "model.sheet.qk_dim=8", "model.sheet.steps=2"]))
    assert not (out / "vit" / "figures").exists()  # train.figures=false
    return out


# ------------------------------------------------------------------ labelled subsets
def test_labelled_subset_is_class_balanced_and_its_hold_out_disjoint():
    cfg = build_config({}, ["preset=digits", "data.labels_fraction=0.1", "data.labels_holdout=0.2"])
    full = build_datasets(build_config({}, ["preset=digits"]).data, cfg.model)
    sets = build_datasets(cfg.data, cfg.model)
    assert len(sets["train"]) + len(sets["val"]) == 126  # 10% of 1,257 training images, rounded per class
    assert np.bincount(sets["train"].labels.numpy()).tolist() == [10] * 10
    assert set(np.bincount(sets["val"].labels.numpy()).tolist()) <= {2, 3}
    assert not set(sets["train"].indices) & set(sets["val"].indices)  # hold-out never trained on
    # both come from the training split only; the test split is untouched
    train_imgs = full["train"].images.flatten(1)
    for split in ("train", "val"):
        imgs = sets[split].images.flatten(1)
        assert all((train_imgs == x).all(1).any() for x in imgs)
    assert torch.equal(sets["test"].images, full["test"].images)
    again = build_datasets(cfg.data, cfg.model)
    assert np.array_equal(again["train"].indices, sets["train"].indices)  # seeded
    other = build_datasets(build_config({}, ["preset=digits", "data.labels_fraction=0.1", "data.labels_seed=3"]).data, cfg.model)
    assert not np.array_equal(other["train"].indices, sets["train"].indices)


# ------------------------------------------------------------------ init_from
def test_init_from_loads_the_sheet_and_reinitialises_the_head(runs, tmp_path):
    src = load_checkpoint(runs / "mim" / "checkpoints" / "last.pt")["model"]
    cfg = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=t", f"init_from={runs / 'mim'}"])
    trainer = Trainer(cfg, tmp_path / "t")
    own = trainer.model.state_dict()
    for k, v in own.items():
        if k.startswith(("sheet.", "embed.")):
            assert torch.equal(v, src[k]), k  # weights of the pre-trained sheet
    report = trainer.init_report
    assert report["skipped"] == sorted(k for k in own if k.startswith("head."))  # the whole head is fresh
    assert "mask_token" in report["unused"] and any(k.startswith("head.query_embed") for k in report["unused"])
    scratch = Trainer(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=s"]), tmp_path / "s")
    assert not torch.equal(scratch.model.state_dict()["sheet.blocks.0.mlp.fc1.weight"], own["sheet.blocks.0.mlp.fc1.weight"])
    ft = json.loads((runs / "ft" / "summary.json").read_text())
    assert ft["init_from"]["skipped"] == report["skipped"]


def test_init_from_a_different_sheet_is_a_clear_error(runs, tmp_path, capsys):
    args = ["train", *TINY, f"out_dir={tmp_path}", "name=bad", f"init_from={runs / 'mim'}", "model.sheet.width=24"]
    assert main(args) == 2  # bad input: a checkpoint that does not fit
    err = capsys.readouterr().err
    assert "does not match this model" in err and "sheet." in err and "Traceback" not in err
    assert main(["train", *TINY, f"out_dir={tmp_path}", "name=bad2", f"init_from={tmp_path / 'nope'}"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_fine_tuning_is_deterministic(runs, tmp_path):
    ft = ["data.labels_fraction=0.1", "data.labels_holdout=0.2", "train.batch_size=32", "train.epochs=2"]
    again = train(build_config({}, [*TINY, *ft, f"out_dir={tmp_path}", "name=ft", f"init_from={runs / 'mim'}"]))
    first = json.loads((runs / "ft" / "summary.json").read_text())
    for k in ("test_loss", "test_acc", "best_val_acc", "steps"):
        assert again[k] == first[k], k
    lines = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("samples_per_s", "train_time_s")} for x in p.read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "ft" / "metrics.jsonl") == lines(runs / "ft" / "metrics.jsonl")


# ------------------------------------------------------------------ probe
def test_probe_is_deterministic_and_sees_the_trained_weights(runs, capsys):
    assert main(["probe", str(runs / "mim"), "--labels-fraction", "0.1"]) == 0
    first = json.loads((runs / "mim" / "probe-f0.1.json").read_text())
    assert main(["probe", str(runs / "mim"), "--labels-fraction", "0.1"]) == 0
    second = json.loads((runs / "mim" / "probe-f0.1.json").read_text())
    assert first == second and first["n_train"] == 126 and first["n_test"] == 360 and first["feature_dim"] == 16
    assert main(["probe", str(runs / "mim"), "--labels-fraction", "0.1", "--at-init"]) == 0
    init = json.loads((runs / "mim" / "probe-f0.1-init.json").read_text())
    assert init["weights"] == "initialisation" and init["test_acc"] != first["test_acc"]
    assert 0.1 < first["test_acc"] <= 1.0
    capsys.readouterr()
    assert main(["probe", str(runs / "mim"), "--labels-fraction", "1.5"]) == 2
    assert "--labels-fraction must be in (0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------ corruptions
def _digits():
    cfg = build_config({}, ["preset=digits", "data.augment=false"])
    return build_datasets(cfg.data, cfg.model)


def test_severity_zero_is_the_identity_and_corruptions_are_seeded():
    sets = _digits()
    test = sets["test"]
    x = torch.rand(1, 8, 8)
    for name in CORRUPTIONS:
        rng = lambda s: np.random.default_rng(s)  # noqa: E731
        assert torch.equal(corrupt(x, name, 0, rng(0)), x), name
        a, b, c = corrupt(x, name, 3, rng(1)), corrupt(x, name, 3, rng(1)), corrupt(x, name, 5, rng(1))
        assert torch.equal(a, b) and not torch.equal(a, x) and not torch.equal(a, c), name
        assert a.min() >= 0 and a.max() <= 1, name
        clean = torch.cat([im for im, _ in corrupted_split(test, name, 0, seed=0)])
        assert torch.equal(clean, test.images), name
        one = torch.cat([im for im, _ in corrupted_split(test, name, 4, seed=0)])
        two = torch.cat([im for im, _ in corrupted_split(test, name, 4, seed=0, batch_size=7)])  # batching is irrelevant
        other = torch.cat([im for im, _ in corrupted_split(test, name, 4, seed=1)])
        assert torch.equal(one, two), name
        assert torch.equal(one, other) == (name in ("blur", "contrast")), name  # the others draw from the seed


def test_corruptions_are_strong_enough_to_matter():
    """Severity 5 of every corruption lowers logistic regression on pixels by at least 20 points."""
    sets = _digits()
    table = accuracy_table(logreg_predictor(sets["train"]), sets["test"], seed=0)
    for name, accs in table.items():
        assert accs[0] > 0.9 and accs[0] - accs[5] >= 0.20, (name, accs)
        assert accs[5] < accs[1] + 1e-9, (name, accs)


def test_robustness_cli_with_baseline_and_errors(runs, capsys):
    assert main(["robustness", str(runs / "ft"), "--baseline", str(runs / "vit")]) == 0
    out = capsys.readouterr().out
    assert "| gaussian_noise | model |" in out and "mCE model:" in out and "mCE logreg:" in out
    res = json.loads((runs / "ft" / "robustness.json").read_text())
    assert set(res["accuracy"]) == {"model", "baseline", "logreg"}
    assert (runs / "ft" / "figures" / "robustness.png").is_file() and (runs / "ft" / "robustness.md").is_file()
    summary = json.loads((runs / "ft" / "summary.json").read_text())
    assert res["clean"]["model"] == pytest.approx(summary["test_acc"])  # severity 0 = the plain test evaluation
    vit = json.loads((runs / "vit" / "summary.json").read_text())
    assert res["clean"]["baseline"] == pytest.approx(vit["test_acc"])
    m, b = res["accuracy"]["model"]["blur"], res["accuracy"]["baseline"]["blur"]
    assert res["ce"]["model"]["blur"] == pytest.approx(sum(1 - a for a in m[1:]) / sum(1 - a for a in b[1:]))
    assert res["mce"]["model"] == pytest.approx(np.mean(list(res["ce"]["model"].values())))
    assert corruption_error(m, m) == 1.0

    capsys.readouterr()
    assert main(["robustness", str(runs / "vit"), "--steps", "3"]) == 2  # a feed-forward sheet has fixed depth
    assert "--steps needs a recurrent run" in capsys.readouterr().err
    assert main(["robustness", str(runs / "mim")]) == 2
    assert "robustness needs a classification run" in capsys.readouterr().err


def test_robustness_steps_unrolls_the_recurrent_sheet_for_another_depth(runs):
    from columnformer.data.base import LabelledSubset
    from columnformer.run import load_run

    model = load_run(runs / "ft").model  # trained with 2 steps
    test = LabelledSubset(_digits()["test"], np.arange(60))
    tables = accuracy_tables(
        {"default": model_predictor(model), "two": model_predictor(model, 2), "four": model_predictor(model, 4)}, test, seed=0
    )
    assert tables["two"] == tables["default"]
    assert tables["four"] != tables["default"]
