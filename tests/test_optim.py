"""AdamW with bf16 / 8-bit moments (issue 17, memory): torch's update, faithful storage, exact resume, wired into training."""

from __future__ import annotations

import io

import pytest
import torch

from columnformer import optim as cf_optim
from columnformer.optim import (BLOCK, AdamW, dequantize_fp8, dequantize_root, quantize_fp8_, quantize_root_,
                                stochastic_round_)


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


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_each_step_is_torch_adamw_given_the_stored_moments(state_dtype):
    """At every step the update equals torch.optim.AdamW's run from the same parameters and the same (bf16- or
    8-bit-stored) moments: the math is AdamW's, only the storage differs. Fails if weight decay, bias correction, eps
    or a beta were handled differently."""
    params, loss = _problem()
    ours = AdamW(_groups(params), lr=3e-2, betas=(0.8, 0.95), eps=1e-6, state_dtype=state_dtype)
    for step in range(1, 8):
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ref = torch.optim.AdamW(_groups(ref_params), lr=3e-2, betas=(0.8, 0.95), eps=1e-6, foreach=False)
        for p, q in zip(params, ref_params):
            if p in ours.state:  # torch's state from ours, moments widened to float32
                m, v = ours.moments(p)
                ref.state[q] = {"step": ours.state[p]["step"].clone(), "exp_avg": m, "exp_avg_sq": v}
        ours.zero_grad()
        loss().backward()
        for p, q in zip(params, ref_params):
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            # to a float32 rounding (the C++ step fuses the weight decay into the update)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")
    stored = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    for p, s in ours.state.items():
        assert s["exp_avg"].dtype == stored and int(s["step"]) == 7
        m, v = ours.moments(p)
        assert m.shape == v.shape == p.shape and m.abs().sum() > 0 and (v > 0).all()


@pytest.mark.parametrize("state_dtype, rel", [("bf16", 0.02), ("8bit", 0.05)])
def test_training_tracks_fp32_adamw(state_dtype, rel):
    """Over 200 steps the loss curve stays within 2 % (bf16) / 5 % (8bit) of fp32 AdamW's and both converge."""
    curves = []
    for make in (lambda g: AdamW(g, lr=1e-2, state_dtype=state_dtype), lambda g: torch.optim.AdamW(g, lr=1e-2)):
        params, loss = _problem()
        opt = make(_groups(params))
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
        assert a == pytest.approx(b, rel=rel)


def test_8bit_first_moment_code_keeps_relative_precision_and_range():
    """The first moment's code, block-wise e4m3: each value comes back within 1/16 of itself (3 mantissa bits, rounded to nearest) down to
    2^-6 of its block's largest magnitude, and within 2^-10 of that largest magnitude below (subnormals); signs kept,
    an all-zero block stays zero, each block has its own scale (a huge block does not flatten a small one)."""
    g = torch.Generator().manual_seed(0)
    mags = torch.exp2(-torch.rand(4 * BLOCK, generator=g) * 14)  # 1 .. 2^-14
    x = mags * torch.where(torch.rand(4 * BLOCK, generator=g) < 0.5, -1.0, 1.0)
    x[BLOCK:2 * BLOCK] *= 1e6  # a block a million times larger
    x[2 * BLOCK:3 * BLOCK] = 0.0
    codes, scales = torch.empty(4 * BLOCK, dtype=torch.uint8), torch.empty(4)
    quantize_fp8_(codes, scales, x.clone())
    y = dequantize_fp8(codes, scales)
    assert torch.isfinite(y).all() and (y[2 * BLOCK:3 * BLOCK] == 0).all()
    blockmax = x.abs().view(4, BLOCK).amax(1).repeat_interleave(BLOCK)
    normal = x.abs() >= blockmax * 2.0**-6
    assert ((y - x).abs() <= x.abs() / 16)[normal].all()
    assert ((y - x).abs() <= blockmax * 2.0**-10 + 1e-30)[~normal].all()
    assert (torch.sign(y) == torch.sign(x))[x.abs() >= blockmax * 2.0**-9].all()
    torch.testing.assert_close(y.view(4, BLOCK).abs().amax(1), x.view(4, BLOCK).abs().amax(1), rtol=1e-6, atol=0)


def test_8bit_root_code_is_logarithmic_and_never_rounds_to_zero():
    """The second moment's root: within 2^(1/32) - 1 = 2.2 % of each value down to 2^-15.9 of its block's largest;
    smaller positive values come back as the smallest code (larger, never 0: no update divided by eps alone); zeros
    stay zero; a block's largest value is kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.exp2(-torch.rand(3 * BLOCK, generator=g) * 20)  # 1 .. 2^-20
    x[BLOCK:2 * BLOCK] *= 1e-6
    x[5] = 0.0
    codes, scales = torch.empty(3 * BLOCK, dtype=torch.uint8), torch.empty(3)
    quantize_root_(codes, scales, x.clone())
    y = dequantize_root(codes, scales)
    blockmax = x.view(3, BLOCK).amax(1).repeat_interleave(BLOCK)
    inside = x >= blockmax * 2.0 ** (-254 / 16)
    assert ((y / x - 1).abs() <= 2 ** (1 / 32) - 1 + 1e-6)[inside].all()
    below = ~inside & (x > 0)
    assert below.any() and (y[below] == blockmax[below] * 2.0 ** (-254 / 16)).all() and (y[below] > x[below]).all()
    assert y[5] == 0 and (y[x > 0] > 0).all()
    torch.testing.assert_close(y.view(3, BLOCK).amax(1), x.view(3, BLOCK).amax(1), rtol=1e-6, atol=0)


def test_8bit_native_step_matches_the_torch_path(monkeypatch):
    """The C++ step (csrc/optim_ops.cpp) and the chunked torch path give the same weights and codes: 20 steps from
    the same start on a parameter ending in a partial block, with weight decay. Fails if either path dropped the
    weight decay, a bias correction, the padding or a code table."""
    from columnformer import native

    if native.load() is None:
        pytest.skip("C++ kernels unavailable")
    monkeypatch.setattr(cf_optim, "CHUNK", 512)  # several chunks per parameter on the torch path
    g = torch.Generator().manual_seed(0)
    init = torch.randn(37, 53, generator=g)
    grads = [torch.randn(37, 53, generator=g) * torch.logspace(0, -4, 53) for _ in range(20)]
    results = []
    for use_native in (True, False):
        monkeypatch.setattr(cf_optim, "USE_NATIVE", use_native)
        p = torch.nn.Parameter(init.clone())
        opt = AdamW([p], lr=1e-2, weight_decay=0.1, state_dtype="8bit")
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p1, s1), (p0, s0) = results
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    assert (p1 - init).abs().max() > 0.05  # the weights moved
    for key in ("exp_avg", "exp_avg_sq_root"):
        diff = (s1[key].int() - s0[key].int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, key
        torch.testing.assert_close(s1[key + "_scale"], s0[key + "_scale"], rtol=1e-5, atol=0)
    assert (s1["exp_avg_sq_root"][37 * 53:] == 0).all() and (s1["exp_avg"][37 * 53:] == 0).all()  # padding


def test_bf16_native_step_tracks_the_torch_path(monkeypatch):
    """The C++ bf16 step and the torch path draw different rounding noise but the same update: after 20 steps the
    weights agree to the noise's effect (mean ~1e-4, largest ~2e-3 here) and both moved; the C++ step's weights and moments are the same
    whatever the thread count (counter-based noise), and differ for another seed (the noise is seeded)."""
    from columnformer import native

    if native.load() is None:
        pytest.skip("C++ kernels unavailable")
    g = torch.Generator().manual_seed(0)
    init = torch.randn(37, 53, generator=g)
    grads = [torch.randn(37, 53, generator=g) for _ in range(20)]

    def run(use_native, seed=0, threads=None):
        monkeypatch.setattr(cf_optim, "USE_NATIVE", use_native)
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            p = torch.nn.Parameter(init.clone())
            opt = AdamW([p], lr=1e-2, weight_decay=0.1, seed=seed)
            for gr in grads:
                p.grad = gr.clone()
                opt.step()
        finally:
            torch.set_num_threads(before)
        return p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()

    (p1, v1), (p0, v0) = run(True), run(False)
    assert (p1 - init).abs().max() > 0.05
    torch.testing.assert_close(p1, p0, rtol=0, atol=3e-3)  # a missing decay or correction: ~1e-2 and more
    assert float((p1 - p0).abs().mean()) < 3e-4
    # each step's rounding moves a stored value by up to one bf16 ulp (0.4-0.8 %) either way; 20 steps at beta2 = 0.999
    torch.testing.assert_close(v1.float(), v0.float(), rtol=2**-4, atol=0)
    assert float(((v1.float() - v0.float()) / v0.float()).abs().mean()) < 0.01
    p2, v2 = run(True, threads=1)
    assert torch.equal(p1, p2) and torch.equal(v1, v2)
    p3, _ = run(True, seed=1)
    assert not torch.equal(p1, p3)


def test_8bit_state_is_a_quarter_of_fp32s():
    """Two 1-byte codes per parameter plus two float32 scales per 256: <= 2.04 bytes per parameter (fp32: 8)."""
    p = torch.nn.Parameter(torch.zeros(1000, 300))
    opt = AdamW([p], state_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes <= 2.04 * p.numel()


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_zero_moments_of_selected_entries(state_dtype):
    """zero_moments_ (rewiring's reset of replaced edges) zeroes exactly the selected entries of both moments."""
    p = torch.nn.Parameter(torch.zeros(37, 11))
    opt = AdamW([p], lr=1e-3, state_dtype=state_dtype)
    p.grad = torch.randn_like(p) + 2.0
    opt.step()
    where = torch.rand(37, 11, generator=torch.Generator().manual_seed(1)) < 0.3
    before = opt.moments(p)
    opt.zero_moments_(p, where)
    for old, new in zip(before, opt.moments(p)):
        assert (new[where] == 0).all() and (old[where] != 0).all()
        torch.testing.assert_close(new[~where], old[~where], rtol=1 / 8, atol=0)


def test_rewiring_zeroes_the_8bit_moments_of_replaced_edges():
    from columnformer import Columnformer, SheetConfig, grid
    from columnformer.connectivity import Connectivity, rewire_sheet

    geo = grid(6, 6)
    sheet = Columnformer(SheetConfig(width=8, steps=2, heads=1, qk_dim=4), geo,
                         Connectivity.local_plus_long_range(geo, 5, 3, scale=2.0, seed=0), input_area="all", output_area="all")
    opt = AdamW(sheet.parameters(), lr=1e-2, state_dtype="8bit")
    out, trace = sheet(torch.randn(3, 36, 8), record=("attn",))
    (out.square().mean() + trace.wiring_cost).backward()
    opt.step()
    old_index = sheet.edge_index.clone()
    assert (opt.moments(sheet.blocks[0].attn.bias)[1] > 0).all()
    assert rewire_sheet(sheet, torch.stack(trace.attn), 0.25, seed=1, optimizer=opt) > 0
    changed = sheet.edge_index != old_index
    m, v = opt.moments(sheet.blocks[0].attn.bias)
    assert (m[changed] == 0).all() and (v[changed] == 0).all() and (v[~changed] > 0).all()


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


@pytest.mark.parametrize("use_native", [True, False], ids=["C++ step", "torch step"])
@pytest.mark.parametrize("state_dtype, rel", [("bf16", 0.01), ("8bit", 0.03)])
def test_second_moment_can_decrease_with_beta2_near_one(state_dtype, rel, use_native, monkeypatch):
    """beta2 = 0.999 and gradients (spread over three decades) that drop by 10x: the stored second moment must fall
    over 500 steps as float32's does (round-to-nearest bf16 storage would freeze it: each step changes it by 0.1 % <
    half a bf16 ulp)."""
    monkeypatch.setattr(cf_optim, "USE_NATIVE", use_native)
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamW([p], lr=1e-9, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=state_dtype)
    ref_v = torch.zeros(4096)
    scale = torch.logspace(0, -3, 4096)[torch.randperm(4096, generator=torch.Generator().manual_seed(0))]
    for step in range(600):
        p.grad = scale * (1.0 if step < 100 else 0.1)
        opt.step()
        ref_v.mul_(0.999).add_(0.001 * p.grad**2)
    v = opt.moments(p)[1]
    assert float(v.mean()) == pytest.approx(float(ref_v.mean()), rel=rel)
    assert float((v / ref_v).median()) == pytest.approx(1.0, rel=rel)


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_state_dict_round_trip_keeps_the_dtype_and_resumes_exactly(monkeypatch, state_dtype):
    """Save after 5 steps (torch.save / weights_only load), continue in a fresh optimizer: the parameters after 10
    steps are bitwise those of an uninterrupted run, and the moments come back as bf16 / 8-bit codes (torch would cast
    them to the parameters' float32). Also with chunks smaller than a tensor (the seed per parameter, not per chunk;
    8bit: a parameter of 1,200 values ends in a partial block)."""
    monkeypatch.setattr(cf_optim, "CHUNK", 256)

    def run(steps, params, opt):
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()

    params, loss = _problem()
    whole = AdamW(_groups(params), lr=1e-2, seed=3, state_dtype=state_dtype)
    run(10, params, whole)
    expected = [p.detach().clone() for p in params]

    params, loss = _problem()
    first = AdamW(_groups(params), lr=1e-2, seed=3, state_dtype=state_dtype)
    run(5, params, first)
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params, loss = _problem()
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    second = AdamW(_groups(params), lr=1e-2, seed=3, state_dtype=state_dtype)
    second.load_state_dict(saved["opt"])
    stored = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    assert all(s["exp_avg"].dtype == stored for s in second.state.values())
    run(5, params, second)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float32 parameters"):
        AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], state_dtype="int4")
    saved = AdamW([torch.nn.Parameter(torch.zeros(3))], state_dtype="8bit")
    saved.param_groups[0]["params"][0].grad = torch.ones(3)
    saved.step()
    other = AdamW([torch.nn.Parameter(torch.zeros(3))], state_dtype="bf16")
    with pytest.raises(ValueError, match="another state_dtype"):
        other.load_state_dict(saved.state_dict())


class _Killed(Exception):
    pass


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_trainer_uses_reduced_moments_and_resumes(tmp_path, monkeypatch, state_dtype):
    """optim.state_dtype=bf16 / 8bit reaches the trainer: the checkpoint's moments are bf16 / uint8 codes (fp32 by
    default, with torch's fused AdamW), and a run killed after its step-4 checkpoint and resumed ends with the weights of the uninterrupted
    run, bit for bit."""
    from columnformer.checkpoint import load_checkpoint
    from columnformer.config import ConfigError, build_config
    from columnformer.train import Trainer, resume, train

    base = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
            "train.batch_size=64", "train.threads=1", "train.progress=false", "train.figures=false",
            "train.epochs=1", "train.max_steps=8", "train.log_every=4", "train.ckpt_every=4", f"out_dir={tmp_path}"]
    train(build_config({}, [*base, "name=whole", f"optim.state_dtype={state_dtype}"]))
    if state_dtype == "bf16":
        train(build_config({}, [*base, "name=fp32", "train.max_steps=4"]))
    save = Trainer.save

    def save_then_die(self, name):
        save(self, name)
        if name == "last" and self.step == 4:
            raise _Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Killed):
        train(build_config({}, [*base, "name=cut", f"optim.state_dtype={state_dtype}"]))
    monkeypatch.setattr(Trainer, "save", save)
    resume(tmp_path / "cut")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert whole["position"]["step"] == cut["position"]["step"] == 8
    stored = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    assert {s["exp_avg"].dtype for s in whole["optimizer"]["state"].values()} == {stored}
    for k, v in whole["model"].items():
        assert torch.equal(cut["model"][k], v), k
    if state_dtype == "8bit":
        return
    fp32 = load_checkpoint(tmp_path / "fp32" / "checkpoints" / "last.pt")
    assert {s["exp_avg"].dtype for s in fp32["optimizer"]["state"].values()} == {torch.float32}
    assert all(g["fused"] for g in fp32["optimizer"]["param_groups"])  # fp32: torch's fused AdamW (a resume keeps it)
    with pytest.raises(ConfigError, match="state_dtype"):
        build_config({}, [*base, "optim.state_dtype=int8"])
    with pytest.raises(ConfigError, match="fsdp"):
        build_config({}, [*base, "optim.state_dtype=bf16", "train.parallel=fsdp"])
