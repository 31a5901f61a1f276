"""Growing sheets (issue 13): identity, function preservation, nearest copies, sparse edges, training on, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from columnformer import geometry as geo
from columnformer.cli import main
from columnformer.config import build_config
from columnformer.expand import expand_run, expand_state, expanded_config, parent_columns, parse_shape
from columnformer.run import load_run
from columnformer.tasks import build_task
from columnformer.train import resume, train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.batch_size=64",
    "train.threads=1", "train.progress=false", "train.figures=false", "train.log_every=1", "optim.lr=5e-3",
    "optim.warmup_frac=0.1",
]


def _model(cfg):
    return build_task(cfg.task, cfg.model).build_model()


def _pair(overrides, to, mode="preserve", noise=0.0, randomize=None):
    cfg = build_config({}, [*TINY, *overrides])
    old = _model(cfg)
    if randomize is not None:
        randomize(old, std=0.3)
    new_cfg = expanded_config(cfg, to)
    new = _model(new_cfg)
    new.load_state_dict(expand_state(old, new, mode, noise))
    return old.eval(), new.eval()


def test_parent_columns_block_map_and_sphere():
    old, new = geo.stacked([(2, 2), (2, 2)]), geo.stacked([(4, 4), (4, 4)])
    parent = parent_columns(old, new)
    assert parent[:16].reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert parent[16:].min() == 4 and np.bincount(parent).tolist() == [4] * 8
    s_old, s_new = geo.sphere(32), geo.sphere(128)
    sp = parent_columns(s_old, s_new)
    d = np.linalg.norm(s_new.coords[:, None] - s_old.coords[None], axis=-1)
    assert np.array_equal(sp, d.argmin(1))
    with pytest.raises(ValueError, match="shrink"):
        parent_columns(new, old)
    with pytest.raises(ValueError, match="layers"):
        parent_columns(geo.stacked([(2, 2)]), new)


def test_parse_shape():
    assert parse_shape("8x8", "stacked", 3) == {"layers": [(8, 8)] * 3}
    assert parse_shape("8x8,6x6", "stacked", 2) == {"layers": [(8, 8), (6, 6)]}
    assert parse_shape("12X10", "grid", 1) == {"shape": (12, 10)}
    assert parse_shape("200", "sphere", 1) == {"n": 200}
    for bad, kind in (("8", "grid"), ("8x8,8x8", "grid"), ("8x8,8x8", "stacked"), ("x", "sphere")):
        with pytest.raises(ValueError, match="--to"):
            parse_shape(bad, kind, 3)


def test_growing_onto_the_same_geometry_is_the_identity(randomize):
    old, new = _pair([], "4x4", randomize=randomize)
    so, sn = old.state_dict(), new.state_dict()
    assert so.keys() == sn.keys() and all(torch.equal(so[k], sn[k]) for k in so)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(old(x)[0], new(x)[0])


@pytest.mark.parametrize("overrides,to", [
    ([], "8x8"),  # stacked 3 x (4x4) -> 3 x (8x8): 48 -> 192 columns, input made retinotopic
    (["model.geometry.layers=[[4,4],[4,4],[2,2]]"], "8x8,8x8,6x6"),  # per layer, top 2x2 -> 6x6 (9 copies each)
    (["model.geometry.kind=grid", "model.geometry.shape=[4,4]", "model.input_area=all", "model.output_area=all"], "12x12"),
    (["model.sheet.attn_mode=linmixing"], "8x8"),
    (["model.pool=spatial"], "8x8,8x8,6x6"),  # spatial pooling: unequal copies of the output columns are fine
])
def test_preserve_keeps_the_logits(overrides, to, randomize):
    old, new = _pair(overrides, to, randomize=randomize)
    assert new.sheet.n > old.sheet.n
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        a, b = old(x)[0], new(x)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item()), (a - b).abs().max()
    assert not torch.allclose(a, torch.zeros_like(a))


def test_preserve_refuses_what_it_cannot_keep():
    cfg = build_config({}, [*TINY, "model.connectivity.kind=local", "model.connectivity.k=8"])
    old = _model(cfg)
    new = _model(expanded_config(cfg, "8x8"))
    with pytest.raises(ValueError, match="dense"):
        expand_state(old, new, "preserve")
    cfg = build_config({}, TINY)
    old, new = _model(cfg), _model(expanded_config(cfg, "6x6"))  # 4 -> 6 rows: unequal copies per column
    with pytest.raises(ValueError, match="same number of times"):
        expand_state(old, new, "preserve")


def test_nearest_on_a_sparse_sheet_keeps_parent_edges_and_inits_new_ones_by_distance(randomize):
    over = ["model.connectivity.kind=local_long_range", "model.connectivity.k=6", "model.connectivity.k_long=3"]
    cfg = build_config({}, [*TINY, *over])
    old = randomize(_model(cfg), std=0.3)
    new = _model(expanded_config(cfg, "8x8"))
    new.load_state_dict(expand_state(old, new, "nearest", noise=0.0))
    parent = torch.from_numpy(parent_columns(old.sheet.geometry, new.sheet.geometry))
    ob, nb = old.sheet.blocks[0].attn.bias, new.sheet.blocks[0].attn.bias
    init = new.sheet.bias_init(new.sheet.connectivity.dist)
    kept = fresh = 0
    for q in range(new.sheet.n):
        for e, k in enumerate(new.sheet.edge_index[q].tolist()):
            old_edges = old.sheet.edge_index[parent[q]].tolist()
            if parent[k].item() in old_edges:
                assert nb[q, e] == ob[parent[q], old_edges.index(parent[k].item())]
                kept += 1
            else:
                assert nb[q, e] == init[q, e]
                fresh += 1
    assert kept > 0 and fresh > 0
    # per-column weights come from the parent
    assert torch.equal(new.sheet.pos_embed, old.sheet.pos_embed[parent])


def test_nearest_noise_breaks_copies_apart(randomize):
    _, same = _pair([], "8x8", "nearest", noise=0.0, randomize=randomize)
    _, noisy = _pair([], "8x8", "nearest", noise=0.05, randomize=randomize)
    w0, w1 = same.sheet.blocks[0].mlp.fc1.weight, noisy.sheet.blocks[0].mlp.fc1.weight
    assert torch.equal(w0[0], w0[1])  # columns 0 and 1 share a parent
    assert not torch.equal(w1[0], w1[1])
    assert ((w1 - w0).std() / w0.std()).item() == pytest.approx(0.05, rel=0.2)


class _Killed(Exception):
    pass


def test_expand_a_trained_run_then_train_on_and_resume_exactly(tmp_path, monkeypatch):
    """A small trained run: preserve keeps its accuracy exactly, nearest within 5 points (the issue's bound);
    training the grown run from init_from and resuming it after a kill gives the uninterrupted run's metrics."""
    from columnformer.train import Trainer

    train(build_config({}, [*TINY, "train.epochs=3", "train.batch_size=16", f"out_dir={tmp_path}", "name=small"]))
    acc = lambda run: json.loads(_eval_json(run))["acc"]  # noqa: E731
    base = acc(tmp_path / "small")
    assert base > 0.3  # it learned something: the bounds below are not about chance
    assert main(["expand", str(tmp_path / "small"), "--to", "8x8", "--out", str(tmp_path / "big")]) == 0
    assert acc(tmp_path / "big") == base
    expand_run(tmp_path / "small", "8x8", tmp_path / "near", mode="nearest")
    assert abs(acc(tmp_path / "near") - base) <= 0.05
    grown = _yaml(tmp_path / "big" / "config.yaml")
    on = ["train.epochs=1", "train.batch_size=64", "train.ckpt_every=5", f"init_from={tmp_path / 'big'}", f"out_dir={tmp_path}"]
    whole = train(build_config(grown, [*on, "name=whole"]))
    save = Trainer.save

    def save_then_die(self, name):
        save(self, name)
        if name == "last" and self.step == 10:
            raise _Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Killed):
        train(build_config(grown, [*on, "name=cut"]))
    monkeypatch.setattr(Trainer, "save", save)
    resumed = resume(tmp_path / "cut")
    assert resumed["test_acc"] == whole["test_acc"] and resumed["steps"] == whole["steps"] == 20
    lines = lambda run: [{k: v for k, v in json.loads(x).items() if k not in ("samples_per_s", "train_time_s")}  # noqa: E731
                         for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert lines("whole") == lines("cut")


def _yaml(path):
    import yaml

    return yaml.safe_load(open(path))


def _eval_json(run):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", str(run)]) == 0
    return buf.getvalue()
