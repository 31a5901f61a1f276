"""AdamW with bf16 moments (issue 17, memory): torch's update, unbiased storage, exact resume, wired into training."""

from __future__ import annotations

import io

import pytest
import torch

from columnformer import optim as cf_optim
from columnformer.optim import AdamW, stochastic_round_


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(40, 30, generator=g))
    b = torch.nn.Parameter(torch.randn(30, generator=g))
    x, y = torch.randn(64, 40, generator=g), torch.randn(64, 30, generator=g)

    def loss():
        return ((x @ w + b - y) ** 2).mean()

    return [w, b], loss


def _groups(params):
    return [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]


def test_each_step_is_torch_adamw_given_the_stored_moments():
    """At every step the update equals torch.optim.AdamW's run from the same parameters and the same (bf16-stored)
    moments: the math is AdamW's, only the storage differs. Fails if weight decay, bias correction, eps or a beta
    were handled differently."""
    params, loss = _problem()
    ours = AdamW(_groups(params), lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    for step in range(1, 8):
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ref = torch.optim.AdamW(_groups(ref_params), lr=3e-2, betas=(0.8, 0.95), eps=1e-6, foreach=False)
        for p, q in zip(params, ref_params):
            if p in ours.state:  # torch's state from ours, moments widened to float32
                s = ours.state[p]
                ref.state[q] = {"step": s["step"].clone(), "exp_avg": s["exp_avg"].float(),
                                "exp_avg_sq": s["exp_avg_sq"].float()}
        ours.zero_grad()
        loss().backward()
        for p, q in zip(params, ref_params):
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-7, msg=f"step {step}")
    for s in ours.state.values():
        assert s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16
        assert int(s["step"]) == 7


def test_training_tracks_fp32_adamw():
    """Over 200 steps the loss curve stays within 2 % of fp32 AdamW's and both converge."""
    curves = []
    for cls in (AdamW, torch.optim.AdamW):
        params, loss = _problem()
        opt = cls(_groups(params), lr=1e-2)
        curve = []
        for _ in range(200):
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.step()
            curve.append(float(value.detach()))
        curves.append(curve)
    assert curves[1][-1] < 0.5 * curves[1][0]
    for a, b in zip(curves[0][::20], curves[1][::20]):
        assert a == pytest.approx(b, rel=0.02)


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_is_not():
    """A value 1/4 of the way between two bf16 neighbours: stochastic rounding averages to it; each result is one
    of the two neighbours."""
    lo = torch.tensor(1.0)
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + ulp / 4)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x.clone(), torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + ulp}
    assert float(out.float().mean()) == pytest.approx(1.0 + ulp / 4, abs=ulp / 100)
    assert float(x.to(torch.bfloat16).float().mean()) == float(lo)  # round to nearest: biased to 1.0
    neg = torch.full((200_000,), -(1.0 + ulp / 4))
    stochastic_round_(out, neg.clone(), torch.Generator().manual_seed(1))
    assert float(out.float().mean()) == pytest.approx(-(1.0 + ulp / 4), abs=ulp / 100)


def test_second_moment_can_decrease_with_beta2_near_one():
    """beta2 = 0.999 and a gradient that drops by 10x: the stored second moment must fall over 500 steps as
    float32's does (round-to-nearest storage would freeze it: each step changes it by 0.1 % < half a bf16 ulp)."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamW([p], lr=1e-9, betas=(0.9, 0.999), weight_decay=0.0)
    ref_v = torch.zeros(4096)
    for step in range(600):
        p.grad = torch.full_like(p, 1.0 if step < 100 else 0.1)
        opt.step()
        ref_v.mul_(0.999).add_(0.001 * p.grad**2)
    v = opt.state[p]["exp_avg_sq"].float()
    assert float(v.mean()) == pytest.approx(float(ref_v.mean()), rel=0.01)


def test_state_dict_round_trip_keeps_bf16_and_resumes_exactly(monkeypatch):
    """Save after 5 steps (torch.save / weights_only load), continue in a fresh optimizer: the parameters after 10
    steps are bitwise those of an uninterrupted run, and the moments come back as bf16 (torch would cast them to
    the parameters' float32). Also with chunks smaller than a tensor (the seed per parameter, not per chunk)."""
    monkeypatch.setattr(cf_optim, "CHUNK", 256)

    def run(steps, params, opt):
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()

    params, loss = _problem()
    whole = AdamW(_groups(params), lr=1e-2, seed=3)
    run(10, params, whole)
    expected = [p.detach().clone() for p in params]

    params, loss = _problem()
    first = AdamW(_groups(params), lr=1e-2, seed=3)
    run(5, params, first)
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params, loss = _problem()
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    second = AdamW(_groups(params), lr=1e-2, seed=3)
    second.load_state_dict(saved["opt"])
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in second.state.values())
    run(5, params, second)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float32 parameters"):
        AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))


class _Killed(Exception):
    pass


def test_trainer_uses_bf16_moments_and_resumes(tmp_path, monkeypatch):
    """optim.state_dtype=bf16 reaches the trainer: the checkpoint's moments are bf16 (fp32 by default, with torch's
    fused AdamW), and a run killed after its step-4 checkpoint and resumed ends with the weights of the uninterrupted
    run, bit for bit."""
    from columnformer.checkpoint import load_checkpoint
    from columnformer.config import ConfigError, build_config
    from columnformer.train import Trainer, resume, train

    base = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
            "train.batch_size=64", "train.threads=1", "train.progress=false", "train.figures=false",
            "train.epochs=1", "train.max_steps=8", "train.log_every=4", "train.ckpt_every=4", f"out_dir={tmp_path}"]
    train(build_config({}, [*base, "name=whole", "optim.state_dtype=bf16"]))
    train(build_config({}, [*base, "name=fp32", "train.max_steps=4"]))
    save = Trainer.save

    def save_then_die(self, name):
        save(self, name)
        if name == "last" and self.step == 4:
            raise _Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Killed):
        train(build_config({}, [*base, "name=cut", "optim.state_dtype=bf16"]))
    monkeypatch.setattr(Trainer, "save", save)
    resume(tmp_path / "cut")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert whole["position"]["step"] == cut["position"]["step"] == 8
    assert {s["exp_avg"].dtype for s in whole["optimizer"]["state"].values()} == {torch.bfloat16}
    fp32 = load_checkpoint(tmp_path / "fp32" / "checkpoints" / "last.pt")
    assert {s["exp_avg"].dtype for s in fp32["optimizer"]["state"].values()} == {torch.float32}
    assert all(g["fused"] for g in fp32["optimizer"]["param_groups"])  # fp32: torch's fused AdamW (a resume keeps it)
    for k, v in whole["model"].items():
        assert torch.equal(cut["model"][k], v), k
    with pytest.raises(ConfigError, match="state_dtype"):
        build_config({}, [*base, "optim.state_dtype=fp8"])
    with pytest.raises(ConfigError, match="fsdp"):
        build_config({}, [*base, "optim.state_dtype=bf16", "train.parallel=fsdp"])
