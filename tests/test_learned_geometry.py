"""Learned column positions (issue 13): gradients, scale-free wiring normaliser, no collapse, reconnection, resume."""

from __future__ import annotations

import json

import pytest
import torch

from columnformer.config import build_config
from columnformer.connectivity import knn_index, reconnect_sheet
from columnformer.tasks import build_task
from columnformer.train import param_groups, resume, train

SMALL = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
         "model.sheet.learn_positions=true"]


def _model(*extra):
    cfg = build_config({}, [*SMALL, *extra])
    return build_task(cfg.task, cfg.model).build_model()


@pytest.mark.parametrize("conn", [[], ["model.connectivity.kind=local_long_range", "model.connectivity.k=6",
                                       "model.connectivity.k_long=2"]])
def test_gradients_reach_the_coordinates(conn):
    m = _model(*conn)
    logits, trace = m(torch.randn(4, 1, 8, 8))
    (trace.wiring_cost + logits.sum() * 0).backward()
    g = m.sheet.positions.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_wiring_weights_start_as_the_fixed_geometry_and_ignore_scale():
    m = _model()
    w, rep = m.sheet.learned_wiring()
    assert torch.allclose(w, m.sheet.wiring_weight, atol=1e-5)  # the fixed geometry's D / mean(D) at the start
    assert rep.item() == 0.0  # nobody is closer than the initial spacing
    with torch.no_grad():
        m.sheet.positions.mul_(0.25)  # a shrunken sheet: the same normalised wiring weights, no cost saved
    w_small, rep_small = m.sheet.learned_wiring()
    assert torch.allclose(w_small, w, atol=1e-5)
    assert rep_small.item() > 0  # but closer than the initial spacing: repelled


@pytest.mark.parametrize("repulsion,collapses", [(1.0, False), (0.0, True)])
def test_positions_do_not_collapse_under_the_repulsion(repulsion, collapses):
    """A toy problem: only a strong wiring cost on the positions (which rewards clustering). With the repulsion the
    minimum pairwise distance stays >= 0.5x the initial spacing; without it the columns collapse (the control)."""
    m = _model(f"model.sheet.position_repulsion={repulsion}")
    opt = torch.optim.Adam([m.sheet.positions], lr=0.05)
    x = torch.randn(16, 1, 8, 8)
    for _ in range(150):
        _, trace = m(x)
        loss = 10.0 * trace.wiring_cost + trace.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pos = m.sheet.positions.detach()
    d = torch.cdist(pos, pos) + torch.eye(len(pos)) * 1e9
    ratio = d.min().item() / m.sheet.min_spacing
    assert (ratio < 0.5) if collapses else (ratio >= 0.5), ratio


def test_positions_get_their_own_learning_rate_without_decay():
    m = _model()
    groups = param_groups(m, 0.1, position_lr=0.02)
    pos = [g for g in groups if any(p is m.sheet.positions for p in g["params"])]
    assert len(pos) == 1 and pos[0]["lr"] == 0.02 and pos[0]["weight_decay"] == 0.0 and len(pos[0]["params"]) == 1


def test_reconnect_rebuilds_local_edges_from_moved_positions():
    m = _model("model.connectivity.kind=local_long_range", "model.connectivity.k=5", "model.connectivity.k_long=2")
    sheet = m.sheet
    with torch.no_grad():
        sheet.blocks[0].attn.bias.normal_()
        sheet.positions[0] += torch.tensor([2.0, 0.0, 0.0])  # column 0 moves two columns to the right
    before_idx, before_bias = sheet.edge_index.clone(), sheet.blocks[0].attn.bias.detach().clone()
    changed = reconnect_sheet(sheet, k=5)
    bias = sheet.blocks[0].attn.bias.detach()
    assert changed > 0
    near = knn_index(sheet.geometry, 7)
    for q in range(sheet.n):
        local = set(sheet.edge_index[q, :5].tolist())
        long_range = set(sheet.edge_index[q, 5:][sheet.edge_mask[q, 5:]].tolist())
        want = [c for c in near[q].tolist() if c not in long_range][:5]
        assert local == set(want), q
        assert torch.equal(sheet.edge_index[q, 5:], before_idx[q, 5:])  # long-range slots kept
        for slot in range(5):
            if sheet.edge_index[q, slot] == before_idx[q, slot]:
                assert bias[q, slot] == before_bias[q, slot]
            else:
                d = sheet.connectivity.dist[q, slot]
                assert bias[q, slot].item() == pytest.approx(sheet.bias_init(d.view(1, 1)).item())


def test_learned_positions_train_resume_exactly_and_are_analysed(tmp_path, monkeypatch):
    from columnformer.analysis.analyze import AnalysisOptions, analyze_run
    from columnformer.train import Trainer

    common = [*SMALL, "train.epochs=1", "train.batch_size=64", "train.threads=1", "train.progress=false",
              "train.figures=false", "train.log_every=2", "train.ckpt_every=6", "train.wiring_lambda=0.1",
              "optim.position_lr=0.05", f"out_dir={tmp_path}"]
    whole = train(build_config({}, [*common, "name=whole"]))
    save = Trainer.save

    class Killed(Exception):
        pass

    def save_then_die(self, name):
        save(self, name)
        if name == "last" and self.step == 12:
            raise Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        train(build_config({}, [*common, "name=cut"]))
    monkeypatch.setattr(Trainer, "save", save)
    resumed = resume(tmp_path / "cut")
    assert resumed["test_acc"] == whole["test_acc"]
    read = lambda r: [{k: v for k, v in json.loads(x).items() if k not in ("samples_per_s", "train_time_s")}  # noqa: E731
                      for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
    assert read("whole") == read("cut")
    assert read("whole")[-2]["position_shift"] > 0.01
    out = analyze_run(tmp_path / "whole", AnalysisOptions(max_batches=1, init=False, figures=True), quiet=True)
    pos = out["trained"]["positions"]
    assert pos["mean_shift"] > 0.01 and pos["min_spacing"] >= 0.5 * pos["initial_min_spacing"]
    assert "learned_positions.png" in out["figures"]


def test_training_reconnects_sparse_edges_on_schedule(tmp_path):
    common = [*SMALL, "model.connectivity.kind=local", "model.connectivity.k=6", "train.epochs=1", "train.max_steps=10",
              "train.threads=1", "train.progress=false", "train.figures=false", "train.wiring_lambda=1.0",
              "optim.position_lr=0.2", f"out_dir={tmp_path}"]
    train(build_config({}, [*common, "name=rc", "train.reconnect_every=5"]))
    events = [json.loads(x) for x in (tmp_path / "rc" / "metrics.jsonl").read_text().splitlines() if '"reconnect"' in x]
    assert [e["step"] for e in events] == [5, 10]
    with pytest.raises(ValueError, match="learn_positions"):
        train(build_config({}, [*common, "name=bad", "train.reconnect_every=5", "model.sheet.learn_positions=false"]))


def test_fixed_spread_keeps_the_rms_spread_and_stops_outliers_inflating_the_normaliser():
    m = _model("model.sheet.position_constraint=fixed_spread")
    sheet = m.sheet
    spread0 = sheet.initial_spread
    with torch.no_grad():
        sheet.positions[0] += torch.tensor([40.0, 0.0, 0.0])  # one column sent far away
    w_out, rep_out = sheet.learned_wiring()
    assert rep_out.item() == 0.0  # the outlier alone violates no spacing
    sheet.constrain_positions()
    pos = sheet.positions.detach()
    spread = (pos - pos.mean(0)).pow(2).sum(1).mean().sqrt().item()
    assert spread == pytest.approx(spread0, rel=1e-5)
    w_fixed, rep_fixed = sheet.learned_wiring()
    # a uniform rescaling leaves D / mean(D) unchanged; what the constraint changes is the absolute scale: the rest of
    # the sheet is now packed below the initial spacing and the repulsion pushes back (pulling the outlier in)
    assert torch.allclose(w_fixed, w_out, atol=1e-5)
    assert rep_fixed.item() > 0.1
    unconstrained = _model()
    unconstrained.sheet.constrain_positions()  # position_constraint=none: nothing moves
    assert torch.equal(unconstrained.sheet.positions, torch.from_numpy(unconstrained.sheet.initial_geometry.coords).float())
