"""Adaptive computation per column (sheet.py halting: act | ponder): invariants, formulas, gradients, trainer."""

import json

import pytest
import torch

from columnformer import geometry as g
from columnformer.sheet import Columnformer, SheetConfig


def _sheet(halting="act", steps=5, untied=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SheetConfig(width=16, steps=steps, qk_dim=8, halting=halting, untied_mlp=untied, untied_attn=untied,
                      untied_norm=untied, **kw)
    return Columnformer(cfg, g.grid(3, 4), input_area="all", output_area="all")


def _set_halt_bias(sheet, bias):
    """Halting units that ignore the state: lambda = sigmoid(bias[column]) at every step."""
    with torch.no_grad():
        sheet.halt.weight.zero_()
        sheet.halt.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).view(sheet.halt.bias.shape))


@pytest.mark.parametrize("halting", ["act", "ponder"])
@pytest.mark.parametrize("bias", [-2.0, 0.0, 1.0, 6.0])
def test_weights_sum_to_one_and_halted_columns_keep_their_state(halting, bias):
    sheet = _sheet(halting, halt_bias=bias, seed=int(bias + 3))
    x = torch.randn(3, 12, 16)
    out, trace = sheet(x, record=("features",))
    w = trace.halt_weights  # (T, B, N)
    assert w.shape == (5, 3, 12) and (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(3, 12), rtol=0, atol=1e-6)
    feats = torch.stack(trace.features)  # (T, B, N, C)
    steps = trace.halt_steps.long()  # (B, N)
    assert steps.min() >= 1 and steps.max() <= 5
    for b in range(3):
        for n in range(12):
            k = int(steps[b, n])
            assert (w[k:, b, n] == 0).all()  # no weight after halting
            for t in range(k, 5):  # the state no longer changes once the column has halted
                assert torch.equal(feats[t, b, n], feats[k - 1, b, n])
    # the output is the halting-weighted mixture of the states
    mix = torch.einsum("tbn,tbnc->bnc", w, feats)
    torch.testing.assert_close(out, mix, rtol=1e-5, atol=1e-5)
    if bias == 6.0 and halting == "act":  # p = 0.998 >= 1 - eps: every column halts after its first step
        assert (steps == 1).all()


@pytest.mark.parametrize("halting", ["act", "ponder"])
def test_never_halting_equals_the_plain_recurrent_sheet(halting):
    plain = _sheet("none")
    sheet = _sheet(halting)
    missing, unexpected = sheet.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("halt.") for k in missing)
    _set_halt_bias(sheet, torch.full((12,), -40.0))  # lambda ~ 0: every column runs to the last step
    x = torch.randn(2, 12, 16)
    ref, _ = plain(x)
    out, trace = sheet(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert (trace.halt_steps == 5).all()
    ref3, _ = plain(x, steps=3)  # the evaluation budget: at most 3 steps
    out3, trace3 = sheet(x, steps=3)
    torch.testing.assert_close(out3, ref3, rtol=1e-6, atol=1e-6)
    assert trace3.halt_weights.shape[0] == 3 and (trace3.halt_steps == 3).all()


def test_act_and_ponder_formulas_on_constant_halting_probabilities():
    lam = torch.tensor([0.3, 0.5, 0.7, 0.1] * 3)
    bias = torch.log(lam / (1 - lam))
    T, eps = 5, 0.01
    act = _sheet("act", steps=T, halt_eps=eps)
    _set_halt_bias(act, bias)
    _, trace = act(torch.randn(2, 12, 16))
    for n, p in enumerate(lam.tolist()):
        # ACT: halt at the first N with N * p >= 1 - eps (or at T); R = 1 - (N - 1) p
        N = next((k for k in range(1, T + 1) if k * p >= 1 - eps), T)
        R = 1 - (N - 1) * p
        assert trace.halt_steps[0, n] == N
        expected = [p] * (N - 1) + [R] + [0.0] * (T - N)
        torch.testing.assert_close(trace.halt_weights[:, 0, n], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    ns = torch.tensor([next((k for k in range(1, T + 1) if k * p >= 1 - eps), T) for p in lam.tolist()], dtype=torch.float32)
    torch.testing.assert_close(trace.ponder, (ns + 1 - (ns - 1) * lam).mean(), rtol=1e-5, atol=1e-6)

    pon = _sheet("ponder", steps=T, halt_eps=eps, ponder_prior=0.4)
    _set_halt_bias(pon, bias)
    _, trace = pon(torch.randn(2, 12, 16))
    prior = torch.tensor([0.4 * 0.6**t for t in range(T)])
    prior = prior / prior.sum()
    kl = []
    for n, p in enumerate(lam.tolist()):
        # PonderNet: w_t = p (1 - p)^(t-1), the column halts once sum w >= 1 - eps; the rest goes to that step
        w, cum = [], 0.0
        for t in range(T):
            wt = p * (1 - p) ** t
            if cum + wt >= 1 - eps or t == T - 1:
                w.append(1 - cum)
                break
            w.append(wt)
            cum += wt
        w = torch.tensor(w + [0.0] * (T - len(w)))
        torch.testing.assert_close(trace.halt_weights[:, 0, n], w, rtol=1e-5, atol=1e-6)
        kl.append(float(sum(wi * (torch.log(wi) - torch.log(pi)) for wi, pi in zip(w, prior) if wi > 0)))
    torch.testing.assert_close(trace.ponder, torch.tensor(kl).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("halting", ["act", "ponder"])
@pytest.mark.parametrize("untied", [True, False])
def test_ponder_cost_reaches_every_halting_unit(halting, untied):
    sheet = _sheet(halting, untied=untied)
    x = torch.randn(4, 12, 16)
    out, trace = sheet(x)
    trace.aux_loss.backward()  # the ponder term alone
    gw, gb = sheet.halt.weight.grad, sheet.halt.bias.grad
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    if untied:  # every column's own unit: weights (N, C, 1) and bias (N, 1)
        assert (gb.abs() > 0).all() and (gw.abs().sum((1, 2)) > 0).all()
    else:
        assert gb.abs().sum() > 0 and gw.abs().sum() > 0
    sheet.zero_grad()
    out, trace = sheet(x)
    (out.square().mean() + trace.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in sheet.parameters() if p.grad is not None)


def test_halting_needs_a_recurrent_sheet_and_its_options_need_halting():
    with pytest.raises(ValueError, match="halting=act needs recurrent=True"):
        SheetConfig(halting="act", recurrent=False)
    with pytest.raises(ValueError, match="ponder_weight apply only when halting is on"):
        SheetConfig(ponder_weight=0.1)  # would be silently ignored
    assert SheetConfig(halting="ponder", ponder_weight=0.1).ponder_weight == 0.1


def test_trainer_adds_the_weighted_ponder_cost_and_logs_it(tmp_path):
    from columnformer.cli import main

    args = [
        "train", "task.name=addition", "task.train_digits=1", "task.max_digits=2", "task.train_size=256",
        "task.val_size=64", "task.test_size=64", "model.geometry.kind=grid", "model.geometry.shape=[1,5]",
        "model.input_area=all", "model.output_area=all", "model.sheet.width=16", "model.sheet.steps=3",
        "model.sheet.qk_dim=8", "model.sheet.halting=act", "model.sheet.ponder_weight=0.5", "train.epochs=1",
        "train.batch_size=32", "train.log_every=1", "train.progress=false", "train.figures=false", "train.threads=1",
        f"out_dir={tmp_path}", "name=act",
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "act" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["type"] == "step"]
    assert len(steps) == 8
    for m in steps:  # loss = task loss + 0.5 * ponder cost (wiring_lambda is 0)
        assert m["ponder_cost"] > 1 and 1 <= m["ponder_steps"] <= 3
        assert m["loss"] == pytest.approx(m["task_loss"] + 0.5 * m["ponder_cost"], rel=1e-5)
    summary = json.loads((tmp_path / "act" / "summary.json").read_text())
    assert 1 <= summary["test_ponder_steps"] <= 3
