"""Model-brain comparison (brain/compare.py) on a synthetic cortex: responses simulated from one area and step."""

import json

import numpy as np
import pytest

pytest.importorskip("himalaya")
pytest.importorskip("rsatoolbox")

from columnformer.brain import compare as B  # noqa: E402
from columnformer.brain import features as F  # noqa: E402
from columnformer.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A feed-forward sheet of two 4x4 layers (3 distinct blocks) trained 4 epochs on digits; its column states for
    the 1,257 training digits, PCA-reduced to 6 channels per column. (After 1 epoch its steps are still near
    copies of each other and recovery drops to 46-100 % per placement.)"""
    root = tmp_path_factory.mktemp("brain")
    args = ["train", "model.geometry.kind=stacked", "model.geometry.layers=[[4,4],[4,4]]", "model.sheet.width=16",
            "model.sheet.qk_dim=8", "model.sheet.steps=3", "model.sheet.recurrent=false", "train.epochs=4", "optim.lr=5e-3",
            "train.progress=false", "train.figures=false", "task.baseline=false", "train.threads=1",
            f"out_dir={root}", "name=r"]
    assert main(args) == 0
    F.export_features(root / "r", "split:train", root / "f", reduce="pca:6", chunk=1024, progress=False)
    return root


def test_synthetic_cortex_finds_area_and_step_above_chance_and_the_noise_ceiling(exported):
    """Targets simulated from two (area, step) placements at SNR 1 (4 repeats): the encoding names the true area
    and step for >= 80 % of targets (chance 1/6) and the NCSNR noise ceiling is within 10 % of the simulated one."""
    fdir = exported / "f"
    hits, ncs = [], []
    for i, (area, step) in enumerate([(1, 1), (0, 2)]):
        resp = B.simulate_responses(fdir, area=area, step=step, targets=12, snr=1.0, repeats=4, seed=i)
        result = B.compare(fdir, resp, exported / f"out{i}", bootstrap=3, figures=i == 0, rsa_stimuli=200, blas_threads=1)
        enc = result["encoding"]
        hits += ((np.asarray(enc["best_area"]) == area) & (np.asarray(enc["best_step"]) == step)).tolist()
        ncs += list(result["noise_ceiling"]["per_target"])
        assert np.median(enc["best_score"]) > 0.5
        rsa = result["rsa"]["per_region"]["synthetic"][area][step]
        assert rsa["ci_low"] <= rsa["rho"] <= rsa["ci_high"] and result["rsa"]["stimuli"] == 200
    assert np.mean(hits) >= 0.8
    expected = 1 / (1 + (1 / 1.0) / 4)  # signal variance 1, noise variance of a 4-repeat mean 1/4
    assert abs(np.mean(ncs) - expected) < 0.1 * expected
    assert {p.name for p in (exported / "out0" / "figures").iterdir()} == {"brain_encoding.png", "brain_best_step.png"}
    saved = json.loads((exported / "out0" / "brain.json").read_text())
    assert saved["targets"] == 12 and len(saved["encoding"]["best_step"]) == 12


def test_pure_noise_is_at_chance(exported):
    fdir = exported / "f"
    ids = json.loads((fdir / "stimuli.json").read_text())
    rng = np.random.default_rng(1)
    resp = B.Responses(rng.standard_normal((len(ids), 4, 12)), ids, np.full(12, "noise"))
    result = B.compare(fdir, resp, exported / "noise", bootstrap=2, figures=False, rsa_stimuli=100, blas_threads=1)
    assert abs(np.mean(result["encoding"]["per_area_step_mean"])) < 0.05  # no prediction beyond chance
    assert np.nanmean(result["noise_ceiling"]["per_target"]) < 0.1


def test_stimuli_are_aligned_by_id_and_bad_responses_are_named(exported, tmp_path, capsys):
    fdir = exported / "f"
    ids = json.loads((fdir / "stimuli.json").read_text())
    full = B.simulate_responses(fdir, area=0, step=2, targets=6, seed=2)
    resp = B.Responses(full.data[:300], full.stimulus_ids[:300], full.regions)  # a subset of the stimuli
    order = np.random.default_rng(0).permutation(300)  # the same stimuli, shuffled: same result
    shuffled = B.Responses(resp.data[order], [resp.stimulus_ids[i] for i in order], resp.regions)
    a = B.compare(fdir, resp, tmp_path / "a", bootstrap=2, figures=False, rsa_stimuli=50, blas_threads=1)["encoding"]["per_target"]
    b = B.compare(fdir, shuffled, tmp_path / "b", bootstrap=2, figures=False, rsa_stimuli=50, blas_threads=1)["encoding"]["per_target"]
    assert np.allclose(np.sort(np.asarray(a).ravel()), np.sort(np.asarray(b).ravel()), atol=0.05)
    np.savez(tmp_path / "r.npz", responses=np.zeros((3, 2)), stimulus_ids=np.array(["x", "y", "z"]))
    assert main(["brain", str(exported / "r"), "--features", str(fdir), "--responses", str(tmp_path / "r.npz")]) == 2
    assert "3 response stimuli are not in the features" in capsys.readouterr().err
    np.savez(tmp_path / "s.npz", responses=np.zeros((3, 2)))
    assert main(["brain", str(exported / "r"), "--features", str(fdir), "--responses", str(tmp_path / "s.npz")]) == 2
    assert "has no 'stimulus_ids' array" in capsys.readouterr().err
    np.savez(tmp_path / "ok.npz", responses=resp.data, stimulus_ids=np.array(resp.stimulus_ids))
    assert main(["brain", str(exported / "r"), "--features", str(fdir), "--responses", str(tmp_path / "ok.npz"),
                 "--banded", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--banded -1: use 0 (off) or a number of random-search samples" in err and "Traceback" not in err


def test_banded_ridge_gives_the_variance_to_the_true_area_and_step(exported):
    """All (area, step) bands in one banded ridge (300 stimuli, 8 targets from area 1, step 2 at SNR 1): the band
    with the largest share of the joint R^2 is the true one for >= 80 % of targets, the shares sum to the joint
    model's out-of-fold R^2, and the joint model predicts as well as the best separate fit."""
    fdir = exported / "f"
    full = B.simulate_responses(fdir, area=1, step=1, targets=8, snr=1.0, repeats=4, seed=3)
    keep = np.random.default_rng(0).permutation(len(full.stimulus_ids))[:300]
    resp = B.Responses(full.data[keep], [full.stimulus_ids[i] for i in keep], full.regions)
    result = B.compare(fdir, resp, exported / "banded", bootstrap=2, figures=False, rsa_stimuli=50, blas_threads=1,
                       banded_iter=6, folds=3)
    band = result["banded"]
    assert np.mean((band["best_area"] == 1) & (band["best_step"] == 1)) >= 0.8
    shares = band["share_per_target"]  # (V, areas, steps)
    assert shares.shape == (8, 2, 3) and np.all(shares[:, 1, 1] > 0.5 * shares.sum((1, 2)))
    joint_r2_bound = band["joint_score"] ** 2  # R^2 <= r^2 for out-of-fold predictions centred like the targets
    assert np.all(shares.sum((1, 2)) <= joint_r2_bound + 1e-6) and np.all(shares.sum((1, 2)) > 0.5 * joint_r2_bound)
    assert np.median(band["joint_score"]) > np.median(result["encoding"]["best_score"]) - 0.03
    text = (exported / "banded" / "brain.md").read_text()
    assert "Banded ridge" in text and "largest share" in text


def test_without_the_brain_extra_the_command_names_it(exported, tmp_path, capsys, monkeypatch):
    import sys

    fdir = exported / "f"
    full = B.simulate_responses(fdir, area=0, step=0, targets=2, seed=0)
    np.savez(tmp_path / "r.npz", responses=full.data[:40], stimulus_ids=np.array(full.stimulus_ids[:40]))
    monkeypatch.setitem(sys.modules, "himalaya", None)  # as if not installed
    code = main(["brain", str(exported / "r"), "--features", str(fdir), "--responses", str(tmp_path / "r.npz"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'columnformer[brain]'" in err and "himalaya" in err and "Traceback" not in err
