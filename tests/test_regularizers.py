"""Activity / weight penalties and activation-sparsity metrics (issue 13): constructed cases and training wiring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from columnformer.config import build_config
from columnformer.layers import per_column_parameters
from columnformer.regularizers import (
    SparsityStats, activation_sparsity, activity_l1, response_pairs, response_smoothness, schedule_factor,
    weight_smoothness, neighbour_weights,
)
from columnformer.factory import build_model
from columnformer.train import train

TINY = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2", "train.epochs=1",
    "train.batch_size=64", "train.threads=1", "train.progress=false", "train.log_every=5", "train.figures=false",
    "train.wiring_lambda=0.01",
]


def _one_hot_states(n: int = 4, c: int = 3) -> torch.Tensor:
    """(N, B, C) states in which every stimulus drives exactly one unit and every unit answers one stimulus."""
    u = n * c
    x = torch.zeros(u, u)  # (B, U): stimulus b drives unit b
    x[torch.arange(u), torch.arange(u)] = 2.0
    return x.view(u, n, c).transpose(0, 1)  # (N, B=U, C)


def test_sparsity_metrics_on_perfectly_sparse_and_dense_states():
    sparse = activation_sparsity(_one_hot_states())
    assert sparse["hoyer"] == pytest.approx(1.0)
    assert sparse["population_sparseness"] == pytest.approx(1.0)
    assert sparse["lifetime_sparseness"] == pytest.approx(1.0)
    assert sparse["near_zero"] == pytest.approx(11 / 12)
    dense = activation_sparsity(torch.full((4, 5, 3), -0.7))  # every unit equally active (magnitudes)
    assert all(dense[k] == pytest.approx(0.0, abs=1e-6) for k in dense)
    mixed = activation_sparsity(torch.randn(4, 32, 8))
    assert all(0.05 < mixed[k] < 0.95 for k in ("hoyer", "population_sparseness", "lifetime_sparseness"))


def test_sparsity_stats_stream_equals_one_pass():
    x = torch.randn(6, 40, 5) * torch.rand(6, 1, 5)  # (N, B, C), unequal unit scales
    whole = SparsityStats()
    whole.add([x, 2 * x.relu()])
    parts = SparsityStats()
    for sl in (slice(0, 16), slice(16, 40)):
        parts.add([x[:, sl], 2 * x[:, sl].relu()])
    one = activation_sparsity(x)
    assert whole.result()["lifetime_sparseness"][0] == pytest.approx(one["lifetime_sparseness"], rel=1e-6)
    assert parts.result()["lifetime_sparseness"] == pytest.approx(whole.result()["lifetime_sparseness"], rel=1e-6)
    assert parts.result()["hoyer"] == pytest.approx(whole.result()["hoyer"], rel=1e-6)  # per-stimulus: batch-free


def test_sparsity_of_a_batch_split_across_processes_equals_one_process():
    """What DDP does: each rank adds its share of the batch, the statistics are summed over ranks."""
    x = torch.randn(5, 24, 4) * torch.rand(5, 1, 4)
    whole = SparsityStats()
    whole.add([x, x.relu()])
    ranks = [SparsityStats(), SparsityStats()]
    ranks[0].add([x[:, :13], x[:, :13].relu()])
    ranks[1].add([x[:, 13:], x[:, 13:].relu()])
    summed = {k: getattr(ranks[0], k) + getattr(ranks[1], k) for k in ("n", "sums", "m1", "m2")}
    for r in ranks:
        it = iter([summed["n"], summed["sums"], summed["m1"], summed["m2"]])
        r.all_reduce(lambda t: next(it))
    for k, v in whole.result().items():
        assert ranks[0].result()[k] == pytest.approx(v, rel=1e-9), k
    empty = SparsityStats()
    empty.add([x[:, :0]])  # a rank with only padding adds nothing, without failing
    assert float(empty.n) == 0


def test_activity_l1_zero_only_for_silent_states():
    assert activity_l1([torch.zeros(3, 4, 5)]).item() == 0.0
    x = torch.randn(3, 4, 5, requires_grad=True)
    v = activity_l1([x, torch.zeros(3, 4, 5)])
    assert v.item() == pytest.approx(x.abs().mean().item() / 2)
    v.backward()
    assert torch.equal(x.grad.sign(), x.detach().sign())


def test_response_smoothness_zero_when_similarity_follows_inverse_distance():
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # a line: d = 1, 1, 2
    pairs, d = response_pairs(coords, radius=2.5)
    pairs_t, inv = torch.from_numpy(pairs), torch.from_numpy(1 / (1 + d)).float()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    a, b = a - a.mean(0), b - b.mean(0)
    b = b - (a * b).sum(0) / (a * a).sum(0) * a  # per channel: b orthogonal to a (over the batch)
    a, b = a / a.std(0, unbiased=False), b / b.std(0, unbiased=False)
    smooth = torch.stack([a, (a + b) / math.sqrt(2), b])  # neighbours share half their signal, ends none
    assert response_smoothness([smooth], pairs_t, inv).item() == pytest.approx(0.0, abs=1e-5)
    reversed_ = torch.stack([a, b, a])  # the far pair identical, the near pairs unrelated: anti-smooth
    assert response_smoothness([reversed_], pairs_t, inv).item() == pytest.approx(2.0, abs=1e-5)
    noise = torch.randn(3, 64, 4, generator=g)
    assert response_smoothness([noise], pairs_t, inv).item() > 0.05


def test_response_pairs_refuse_a_single_distance():
    with pytest.raises(ValueError, match="radius"):
        response_pairs(np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 10.0]]), radius=1.5)


def test_weight_smoothness_zero_for_equal_columns_positive_otherwise():
    coords = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0)), -1).reshape(-1, 2)
    idx, w = neighbour_weights(coords, k=4)
    idx, w = torch.from_numpy(idx), torch.from_numpy(w)
    assert torch.allclose(w.sum(1), torch.ones(16))
    same = torch.randn(1, 5, 3).expand(16, 5, 3).clone()
    assert weight_smoothness([same, 3 * same], idx, w).item() == pytest.approx(0.0, abs=1e-6)
    rough = torch.randn(16, 5, 3, requires_grad=True)
    v = weight_smoothness([rough], idx, w)
    assert v.item() > 0.3
    v.backward()
    assert rough.grad.abs().sum() > 0


def test_untied_parameters_are_the_per_column_weights():
    model = build_model("digits")
    params = per_column_parameters(model.sheet, biases=False)
    n = model.sheet.n
    assert params and all(p.shape[0] == n for p in params)
    assert len(params) == 6  # q, k, fc1, fc2 weights + 2 layer-norm weights
    assert per_column_parameters(build_model("digits-vit").sheet) == []


def test_schedule_factor():
    assert schedule_factor(0, 100, 0.0, 0.0) == 1.0
    assert schedule_factor(49, 100, 0.5, 0.0) == 0.0
    assert schedule_factor(50, 100, 0.5, 0.2) == 0.0
    assert schedule_factor(60, 100, 0.5, 0.2) == pytest.approx(0.5)
    assert schedule_factor(90, 100, 0.5, 0.2) == 1.0


def _steps(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x and '"type": "step"' in x]


def test_penalties_enter_the_loss_with_their_schedule(tmp_path):
    """loss - task_loss is exactly lambda * wiring + each active weight * its logged value (0 before `start`)."""
    extra = ["train.penalties.activity_l1.weight=0.05", "train.penalties.weight_smoothness.weight=0.2",
             "train.penalties.weight_smoothness.start=0.5", "train.penalties.response_smoothness.weight=0.1"]
    train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=pen", *extra]))
    steps = _steps(tmp_path / "pen")
    assert len(steps) >= 4
    for rec in steps:
        on = rec["step"] > 10  # weight_smoothness turns on after half of the 20 steps (logged windows of 5 steps)
        expect = (0.01 * rec["wiring_cost"] + 0.05 * rec["activity_l1"] + 0.1 * rec["response_smoothness"]
                  + (0.2 * rec["weight_smoothness"] if on else 0.0))
        assert rec["loss"] - rec["task_loss"] == pytest.approx(expect, rel=1e-4, abs=1e-6), rec
        assert {"near_zero", "hoyer", "population_sparseness", "lifetime_sparseness"} <= rec.keys()


def test_activity_l1_penalty_lowers_activity(tmp_path):
    train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=free"]))
    train(build_config({}, [*TINY, f"out_dir={tmp_path}", "name=l1", "train.penalties.activity_l1.weight=1.0"]))
    free, l1 = _steps(tmp_path / "free"), _steps(tmp_path / "l1")
    assert "activity_l1" not in free[-1]  # no penalty: not computed, sparsity still logged
    assert "hoyer" in free[-1]
    # without the penalty the activity is not logged; compare the sparsity metrics the two runs share
    assert l1[-1]["near_zero"] > free[-1]["near_zero"] + 0.02
    assert l1[-1]["activity_l1"] < l1[0]["activity_l1"]


def test_weight_smoothness_needs_untied_weights(tmp_path):
    cfg = build_config({}, [*TINY, f"out_dir={tmp_path}", "name=vit", "preset=digits-vit",
                            "train.penalties.weight_smoothness.weight=0.1"])
    with pytest.raises(ValueError, match="untied"):
        train(cfg)
