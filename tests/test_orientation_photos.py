"""Natural-image patches, the v1 preset and orientation maps (issue 14): constructed maps, disjoint photo regions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from columnformer.analysis.orientation import (
    analyze_orientation, gratings, map_statistics, map_wavelength, pinwheel_density, pinwheels,
    preferred_orientation, tuning,
)
from columnformer.config import build_config
from columnformer.data.photos import band_rows, photo_patches
from columnformer.train import train


def _grid(h=40, w=40):
    return np.mgrid[0:h, 0:w].astype(float)


def test_pinwheels_of_a_constructed_map():
    yy, xx = _grid()
    centres = [(10.3, 12.6, 1), (25.7, 30.2, -1), (30.4, 8.1, 1)]  # (row, col, charge), off the grid points
    z = np.ones_like(xx, dtype=complex)
    for r, c, q in centres:
        d = (xx - c) + 1j * (yy - r)
        z *= d if q > 0 else np.conj(d)  # theta = arg(z)/2 turns by +-pi around each centre
    pos, sign = pinwheels(z)
    assert len(pos) == 3
    found = sorted((int(p[0]), int(p[1]), int(s)) for p, s in zip(pos, sign))
    assert found == sorted((int(r), int(c), q) for r, c, q in centres)
    assert len(pinwheels(np.exp(2j * 0.3 * xx))[0]) == 0  # a smooth map (stripes of orientation) has none


def test_osi_and_preference_of_constructed_tuning_curves():
    thetas = np.pi * np.arange(8) / 8
    pref = np.array([0.0, 0.5, 1.2, 2.9])
    depth = np.array([0.6, 0.2, 1.0, 0.0])
    curves = 1 + depth * np.cos(2 * (thetas[:, None] - pref))  # (O, N)
    got, osi = preferred_orientation(curves, thetas)
    assert np.allclose(osi, depth / 2, atol=1e-12)  # vector-sum OSI of 1 + m cos(2(theta - theta*)) is m / 2
    assert np.allclose(got[:3], pref[:3], atol=1e-9)
    # through the grating pipeline: responses built from the curves, one frequency preferred
    imgs, params = gratings((8, 8), orientations=8, frequencies=(0.1, 0.2), phases=2)
    resp = np.stack([(1 + depth * np.cos(2 * (t - pref))) * (2.0 if f == 0.2 else 1.0) for t, f, _ in params])
    tun = tuning(resp, params)
    assert np.allclose(tun["osi"], depth / 2) and np.all(tun["best_frequency"] == 0.2)
    assert imgs.shape == (32, 1, 8, 8) and 0 <= imgs.min() and imgs.max() <= 1


def test_band_pass_noise_density_near_pi_and_the_null_tracks_the_spectrum():
    rng = np.random.default_rng(0)
    n, lam = 96, 8.0
    k = np.sqrt(np.add.outer(np.fft.fftfreq(n) ** 2, np.fft.fftfreq(n) ** 2))
    ring = np.exp(-((k - 1 / lam) ** 2) / (2 * 0.01**2))
    z = np.fft.ifft2(ring * np.exp(2j * np.pi * rng.random((n, n))))
    assert map_wavelength(z) == pytest.approx(lam, rel=0.15)
    stats = map_statistics(z, n_null=40)
    assert 2.0 < stats["density"] < 4.5  # ~pi for a random band-pass field
    assert stats["null_density_ci95"][0] <= stats["density"] * 1.3 and stats["null_density_ci95"][1] >= stats["density"] * 0.7
    yy, xx = _grid(n, n)
    stripes = np.exp(2j * 2 * np.pi * xx / lam)  # orientation changes smoothly along x: no pinwheels at all
    assert pinwheel_density(stripes) == 0.0


def test_photo_patches_come_from_disjoint_bands_and_are_seeded():
    arrays = photo_patches((16, 16), {"train": 200, "val": 40, "test": 40}, in_chans=1, split_seed=3)
    again = photo_patches((16, 16), {"train": 200, "val": 40, "test": 40}, in_chans=1, split_seed=3)
    other = photo_patches((16, 16), {"train": 200, "val": 40, "test": 40}, in_chans=1, split_seed=4)
    assert np.array_equal(arrays["train"][0], again["train"][0])
    assert not np.array_equal(arrays["train"][0], other["train"][0])
    bands = band_rows(427, 0.1, 0.2)
    for split, (x, corners) in arrays.items():
        assert x.shape[1:] == (1, 16, 16) and 0 <= x.min() and x.max() <= 1
        r0, r1 = bands[split]
        assert (corners[:, 1] >= r0).all() and (corners[:, 1] + 16 <= r1).all(), split  # wholly inside its band
    rows = {s: set() for s in arrays}
    for split, (_, corners) in arrays.items():
        for _, r, _ in corners:
            rows[split].update(range(r, r + 16))
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert arrays["train"][0].std() > 0.05  # real image content, not a constant


def test_v1_style_run_trains_on_photos_and_maps_orientation(tmp_path):
    cfg = build_config({}, [
        "preset=v1", "task=mim", "data.name=photos", "data.photo_patches=128", "model.image_size=[16,16]",
        "model.geometry.shape=[8,8]", "model.connectivity.k=8", "model.sheet.width=8", "model.sheet.steps=2",
        "train.epochs=1", "train.batch_size=32", "train.threads=1", "train.progress=false", "train.figures=false",
        f"out_dir={tmp_path}", "name=v1tiny",
    ])
    summary = train(cfg)
    assert summary["test_loss"] > 0
    r = analyze_orientation(tmp_path / "v1tiny", n_null=10, n_boot=5, phases=2)
    assert len(r["layers"]) == 1 and r["layers"][0]["shape"] == [8, 8] and r["layers"][0]["pinwheels"] >= 0
    out = tmp_path / "v1tiny" / "brain" / "orientation"
    assert (out / "brain.md").is_file() and (out / "figures" / "orientation_map.png").is_file()
    arrays = np.load(out / "orientation_arrays.npz")
    assert arrays["osi"].shape == (64,) and ((arrays["osi"] >= 0) & (arrays["osi"] <= 1)).all()
    assert json.loads((out / "orientation.json").read_text())["stimuli"] == 8 * 3 * 2


def test_orientation_at_init_differs_from_the_trained_sheet(tmp_path):
    cfg = build_config({}, [
        "preset=v1", "task=mim", "data.name=photos", "data.photo_patches=64", "model.image_size=[16,16]",
        "model.geometry.shape=[8,8]", "model.connectivity.k=8", "model.sheet.width=8", "model.sheet.steps=1",
        "train.epochs=2", "train.batch_size=16", "train.threads=1", "train.progress=false", "train.figures=false",
        "optim.lr=0.01", f"out_dir={tmp_path}", "name=r",
    ])
    train(cfg)
    trained = analyze_orientation(tmp_path / "r", n_null=0, n_boot=0, phases=2)
    init = analyze_orientation(tmp_path / "r", n_null=0, n_boot=0, phases=2, at_init=True)
    assert init["weights"] == "initialisation" and (tmp_path / "r" / "brain" / "orientation-init" / "brain.md").is_file()
    a = np.load(tmp_path / "r" / "brain" / "orientation" / "orientation_arrays.npz")["osi"]
    b = np.load(tmp_path / "r" / "brain" / "orientation-init" / "orientation_arrays.npz")["osi"]
    assert not np.allclose(a, b)  # the trained weights, not the initial ones, were read


def test_grid_resample_returns_a_grid_map_unchanged_and_follows_moved_columns():
    from columnformer.analysis.orientation import grid_resample

    yy, xx = _grid(6, 6)
    z = np.exp(2j * 0.3 * xx) * (1 + yy / 10)
    xy = np.stack([yy.ravel(), xx.ravel()], 1)
    assert np.allclose(grid_resample(xy, z.ravel(), (6, 6)), z.ravel())  # on the grid: unchanged
    shuffled = np.random.default_rng(0).permutation(36)
    # moving the columns (here: permuting which column sits where) moves their values with them
    assert np.allclose(grid_resample(xy[shuffled], z.ravel()[shuffled], (6, 6)), z.ravel())


def test_tile_bootstrap_interval_contains_the_density_and_narrows_with_area():
    from columnformer.analysis.orientation import tile_bootstrap

    rng = np.random.default_rng(0)

    def band_pass(n):
        k = np.sqrt(np.add.outer(np.fft.fftfreq(n) ** 2, np.fft.fftfreq(n) ** 2))
        ring = np.exp(-((k - 1 / 8) ** 2) / (2 * 0.01**2))
        return np.fft.ifft2(ring * np.exp(2j * np.pi * rng.random((n, n))))

    widths = []
    for n in (48, 128):
        z = band_pass(n)
        d = pinwheel_density(z, 8.0)
        lo, hi = tile_bootstrap(z, 8.0, 200, np.random.default_rng(1))
        assert lo <= d <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0]
