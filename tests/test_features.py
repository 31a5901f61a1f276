"""Feature export (brain/features.py): equal to the trace's features, chunked, reduced, from every stimulus source."""

import json

import numpy as np
import pytest
import torch

from columnformer.brain import features as F
from columnformer.cli import main
from columnformer.run import load_run

TINY = ["model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=3", "train.epochs=1", "train.max_steps=2",
        "train.progress=false", "train.figures=false", "task.baseline=false", "train.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    assert main(["train", *TINY, f"out_dir={root}", "name=r"]) == 0
    return root / "r"


def _reference(run_dir, inputs):
    model = load_run(run_dir).model
    with torch.no_grad():
        _, trace = model(inputs, record=("features",))
    return torch.stack(trace.features, dim=1).numpy()  # (S, T, N, C)


def test_export_equals_the_trace_features_and_respects_the_chunk(run, tmp_path, monkeypatch):
    seen = []
    original = F._column_states

    def spy(model, inputs, steps):
        seen.append(len(inputs))
        return original(model, inputs, steps)

    monkeypatch.setattr(F, "_column_states", spy)
    out = F.export_features(run, "split:test", tmp_path / "f", chunk=37, progress=False)
    test_images = torch.stack([x for x, _ in _test_set(run)])
    ref = _reference(run, test_images)
    assert out.features.shape == ref.shape == (len(test_images), 3, 16, 16)
    np.testing.assert_allclose(out.features, ref, rtol=1e-5, atol=1e-6)
    assert max(seen) == 37 and sum(seen) == len(test_images)  # never more than a chunk at a time
    assert out.coords.shape == (16, 2) and out.areas.tolist() == [0] * 16
    assert out.stimulus_ids[:2] == ["test/0", "test/1"]
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["shape"] == {"stimuli": len(test_images), "steps": 3, "columns": 16, "channels": 16}
    assert not list((tmp_path / "f").glob("*.tmp"))


def _test_set(run):
    from columnformer.run import read_run_config
    from columnformer.tasks import build_task

    cfg = read_run_config(run)
    task = build_task(cfg.task, cfg.model)
    return task.datasets(cfg.data.model_copy(update={"augment": False}), cfg.model, seed=cfg.train.seed)["test"]


def test_reductions(run, tmp_path):
    images = torch.stack([x for x, _ in _test_set(run)])[:20]
    np.save(tmp_path / "imgs.npy", images.numpy())
    ref = _reference(run, images)  # (20, 3, 16, 16)
    mean = F.export_features(run, str(tmp_path / "imgs.npy"), tmp_path / "m", reduce="mean", chunk=8, progress=False)
    np.testing.assert_allclose(mean.features[..., 0], ref.mean(-1), rtol=1e-5, atol=1e-6)
    rand = F.export_features(run, str(tmp_path / "imgs.npy"), tmp_path / "r", reduce="random:5", chunk=8, progress=False)
    proj = (torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) / 5**0.5).numpy()
    np.testing.assert_allclose(rand.features, ref @ proj, rtol=1e-4, atol=1e-5)
    pca = F.export_features(run, str(tmp_path / "imgs.npy"), tmp_path / "p", reduce="pca:3", chunk=8, progress=False)
    flat = np.asarray(pca.features).reshape(-1, 3)
    var = flat.var(0)
    assert pca.features.shape == (20, 3, 16, 3) and var[0] >= var[1] >= var[2] > 0
    # the components span the top principal subspace of the channel vectors (IncrementalPCA ~ exact PCA)
    x = ref.reshape(-1, 16) - ref.reshape(-1, 16).mean(0)
    top = np.linalg.svd(x, full_matrices=False)[2][:3].T  # (16, 3)
    recon = flat @ np.linalg.lstsq(flat, x @ top, rcond=None)[0]
    assert np.abs(recon - x @ top).max() < 1e-2 * np.abs(x @ top).max()


def test_image_folder_and_bad_input(run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "stim"
    (folder / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a/c.png", "a/d.png"):
        Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = F.export_features(run, str(folder), tmp_path / "o", chunk=2, progress=False)
    assert out.features.shape == (3, 3, 16, 16) and out.stimulus_ids == ["a/c.png", "a/d.png", "b.png"]
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), np.float32))
    for args, words in [
        (["--stimuli", str(tmp_path / "bad.npy")], "takes images (S, 1, 8, 8)"),
        (["--stimuli", "split:nope"], "has the splits train, val, test"),
        (["--stimuli", str(tmp_path / "missing")], "does not exist"),
        (["--stimuli", "split:test", "--reduce", "pca:0"], "use none, mean, random:K or pca:K"),
        (["--stimuli", "split:test", "--reduce", "pca:99"], "exceeds the column width 16"),
    ]:
        assert main(["features", str(run), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_token_sequences_of_an_arithmetic_run(tmp_path):
    args = ["train", "task.name=addition", "task.train_digits=1", "task.max_digits=2", "task.train_size=64",
            "task.val_size=16", "task.test_size=16", "model.geometry.kind=grid", "model.geometry.shape=[1,5]",
            "model.input_area=all", "model.output_area=all", "model.sheet.width=8", "model.sheet.steps=2",
            "model.sheet.qk_dim=4", "train.epochs=1", "train.progress=false", "train.figures=false",
            f"out_dir={tmp_path}", "name=a"]
    assert main(args) == 0
    tokens = np.array([[1, 10, 11, 2, 10], [3, 4, 11, 5, 6]], dtype=np.int64)
    np.save(tmp_path / "tok.npy", tokens)
    out = F.export_features(tmp_path / "a", str(tmp_path / "tok.npy"), tmp_path / "o", progress=False)
    np.testing.assert_allclose(out.features, _reference(tmp_path / "a", torch.from_numpy(tokens)), rtol=1e-5, atol=1e-6)


_BOUNDED = r"""
import resource, sys
import numpy as np
import torch
from columnformer.brain import features as F

run, stim, out = sys.argv[1:4]
torch.set_num_threads(1)
F.export_features(run, stim, out + "-warm", chunk=64, steps=40, progress=False)  # allocator and caches warm
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmData:")) * 1024
budget = 32 << 20
resource.setrlimit(resource.RLIMIT_DATA, (vm + budget, resource.getrlimit(resource.RLIMIT_DATA)[1]))
try:  # the limit bites: holding the output in memory would not fit
    np.ones(80 << 20, dtype=np.uint8)
    print("limit not enforced"); sys.exit(3)
except MemoryError:
    pass
f = F.export_features(run, stim, out, chunk=64, steps=40, progress=False)
print("ok", f.features.shape, float(np.asarray(f.features[-1]).sum()))
"""


def test_export_streams_within_a_memory_budget_smaller_than_its_output(run, tmp_path):
    """2,048 stimuli x 40 steps x 16 columns x 16 channels = 80 MiB of features written under a data-segment
    limit (RLIMIT_DATA: private anonymous memory, not the file-backed memmap) of 32 MiB above the warmed-up
    process: an export that collected the features in memory before writing them would fail here."""
    import subprocess
    import sys

    images = torch.stack([x for x, _ in _test_set(run)])
    stim = images.repeat(2048 // len(images) + 1, 1, 1, 1)[:2048]
    np.save(tmp_path / "many.npy", stim.numpy())
    res = subprocess.run([sys.executable, "-c", _BOUNDED, str(run), str(tmp_path / "many.npy"), str(tmp_path / "o")],
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stdout.startswith("ok (2048, 40, 16, 16)"), res.stdout + res.stderr[-2000:]
    feats = np.load(tmp_path / "o" / "features.npy", mmap_mode="r")
    ref = _reference_steps(run, images[:5], 40)
    np.testing.assert_allclose(feats[:5], ref, rtol=1e-5, atol=1e-6)


def _reference_steps(run_dir, inputs, steps):
    model = load_run(run_dir).model
    with torch.no_grad():
        _, trace = model(inputs, record=("features",), steps=steps)
    return torch.stack(trace.features, dim=1).numpy()
