"""One training step of the tiny presets on this CPU: model FLOPs, time, memory, MFU, breakdown.

    python benchmarks/train_step.py                              # all three presets, fp32 and bf16
    python benchmarks/train_step.py --presets columnformer-rec-tiny --dtypes bf16 --steps 5

A step = forward, backward (cross-entropy + 0.01 * wiring cost) and an AdamW step, batch 32 of
random 128x128 images. Every (preset, dtype) runs in a fresh child process, so its peak memory is
that child's RSS high-water mark (``ru_maxrss`` from ``os.wait4``, which includes the interpreter
and torch, about 0.3 GiB).

MFU = analytic model FLOPs per step / median step time / the machine's own large-GEMM fp32 FLOP/s,
measured in the same run (2048^3 matmul, best of the per-child medians: the conservative choice on a
shared machine). The bf16 step is reported as "fp32-equivalent MFU" against the same fp32 GEMM rate;
the bf16 GEMM rate is printed beside it. Model FLOPs are written out per component (patch embed,
q/k/v/proj, attention scores and weighted sum, MLP, head; multiply-add = 2 FLOPs; training = 3 x
forward) and checked against ``torch.utils.flop_counter.FlopCounterMode`` on a forward pass. Work the
implementation does on top of the model's FLOPs (block-diagonal or masked dense matmuls, recomputation)
never raises MFU: it is not in the numerator.

The time breakdown comes from ``torch.profiler`` on one extra step: every op's self time is put in
one category, by the region it runs in (``cf::attention``, the untied-layer autograd functions, the
optimizer) and otherwise by its name (matmul / conv, layer norm, everything else).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRESETS = ("vit-tiny", "columnformer-ff-tiny", "columnformer-rec-tiny")
BATCH = 32


# ----------------------------------------------------------------------------------------------
# Analytic model FLOPs
# ----------------------------------------------------------------------------------------------


def model_flops(model, batch: int) -> dict[str, float]:
    """Forward FLOPs per component for one batch (multiply-add = 2). Dense attention: all N x N pairs;
    a sparse connectivity counts its real edges only."""
    sheet, embed, head = model.sheet, model.embed, model.head
    cfg = sheet.cfg
    n, c, t = sheet.n, cfg.width, cfg.steps
    h, dqk = cfg.heads, cfg.qk_dim
    hidden = int(c * cfg.mlp_ratio)
    edges = sheet.connectivity.num_edges()  # N*N when dense
    conv = embed.proj
    patch_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    f = {
        "patch embed": 2 * embed.num_patches * patch_in * c,
        "q/k": t * 2 * (2 * n * c * h * dqk),
        "v/proj": t * 2 * (2 * n * c * c) if cfg.value_proj else 0,
        "attn scores QK^T": t * 2 * h * edges * dqk,
        "attn weighted sum AV": t * 2 * h * edges * (c // h),
        "MLP": t * 2 * (2 * n * c * hidden),
        "head": 2 * c * head.fc.out_features,
    }
    return {k: float(v * batch) for k, v in f.items()}


def counted_forward_flops(model, images) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Measurements (run in a child process)
# ----------------------------------------------------------------------------------------------


def gemm_flops(dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    ts, cs = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return 2 * n**3 / statistics.median(ts), 2 * n**3 / statistics.median(cs)


def _category(ev) -> str:
    """Which bucket an op's self time belongs to."""
    regions = []
    p = ev
    while p is not None:
        regions.append(p.name)
        p = p.cpu_parent
    joined = " | ".join(regions)
    name = ev.name
    if "Optimizer." in joined:
        return "optimizer"
    is_mm = any(s in name for s in ("mm", "matmul", "linear", "conv", "mkldnn"))
    if "cf::attention" in joined or "_DenseAttention" in joined:
        return "attention GEMMs" if is_mm else "attention softmax/stats"
    if "cf::untied" in joined or "_UntiedUse" in joined or "_Tap" in joined:
        return "untied linear GEMMs" if is_mm else "untied linear other (cast/cat)"
    if is_mm:
        return "tied linear / conv / head GEMMs"
    if "layer_norm" in name:
        return "layer norms"
    return "elementwise / other"


def breakdown(step) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        cat = _category(ev)
        out[cat] = out.get(cat, 0.0) + ev.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_one(preset: str, dtype: str, steps: int, warmup: int, threads: int, profile_step: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from columnformer import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=True)
        optimizer = "AdamW(fused=True)"
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.05, betas=(0.9, 0.95), foreach=True)
        optimizer = "AdamW(foreach=True)"
    images = torch.randn(BATCH, 3, 128, 128)
    labels = torch.randint(0, 100, (BATCH,))
    bf16 = dtype == "bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, trace = model(images)
            loss = F.cross_entropy(logits.float(), labels) + 0.01 * trace.wiring_cost
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    comps = model_flops(model, BATCH)
    fwd = sum(comps.values())
    counted = counted_forward_flops(model, images)
    (gemm32, gemm32_cpu), (gemm16, gemm16_cpu) = gemm_flops(torch.float32), gemm_flops(torch.bfloat16)
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    g2, g2c = gemm_flops(torch.float32)  # again after the steps: the best of two
    gemm32, gemm32_cpu = max(gemm32, g2), max(gemm32_cpu, g2c)
    res = dict(
        preset=preset, dtype=dtype, optimizer=optimizer, params=sum(p.numel() for p in model.parameters()),
        components=comps, fwd_flops=fwd, train_flops=3 * fwd, counted_fwd_flops=counted,
        step_times=times, step_time=statistics.median(times), gemm_fp32=gemm32, gemm_bf16=gemm16,
        step_cpu_time=statistics.median(cpu_times), gemm_fp32_cpu=gemm32_cpu, gemm_bf16_cpu=gemm16_cpu,
        threads=threads, load=os.getloadavg()[0],
    )
    if profile_step:
        res["breakdown"] = breakdown(step)
    return res


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def spawn(preset: str, dtype: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", preset, dtype, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads)] + (["--no-profile"] if args.no_profile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child {preset} {dtype} failed (status {status})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    return res


def fmt_g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = run_one(args.child[0], args.child[1], args.steps, args.warmup, args.threads, not args.no_profile)
        print(json.dumps(res))
        return

    results = [spawn(p, d, args) for p in args.presets for d in args.dtypes]
    gemm32 = max(r["gemm_fp32"] for r in results)
    gemm16 = max(r["gemm_bf16"] for r in results)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {args.threads}; 1-min load average per child: "
          + ", ".join(f"{r['load']:.1f}" for r in results) + f"; at the end {os.getloadavg()[0]:.1f}")
    print(f"large-GEMM (2048^3) FLOP/s measured in this run: fp32 {fmt_g(gemm32)} G, bf16 {fmt_g(gemm16)} G "
          f"(bf16/fp32 = {gemm16 / gemm32:.2f})\n")

    print("## Model FLOPs per forward, batch 32 (GFLOP)\n")
    seen = set()
    for r in results:
        if r["preset"] in seen:
            continue
        seen.add(r["preset"])
        parts = ", ".join(f"{k} {fmt_g(v)}" for k, v in r["components"].items() if v)
        print(f"- {r['preset']} ({r['params']:,} params): {parts}; total {fmt_g(r['fwd_flops'])}, "
              f"FlopCounterMode {fmt_g(r['counted_fwd_flops'])} (ratio {r['counted_fwd_flops'] / r['fwd_flops']:.4f}); "
              f"train step (3x) {fmt_g(r['train_flops'])}")

    print("\n## Train step (forward + backward + AdamW), batch 32\n")
    gemm32c = max(r["gemm_fp32_cpu"] for r in results)
    print("| preset | dtype | step time (s, median) | model GFLOP/s | MFU (vs fp32 GEMM) | vs bf16 GEMM "
          "| CPU-time MFU | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r["train_flops"] / r["step_time"]
        label = "fp32-equiv. " if r["dtype"] == "bf16" else ""
        vs16 = f"{rate / gemm16:.1%}" if r["dtype"] == "bf16" else "-"
        cpu_mfu = r["train_flops"] / r["step_cpu_time"] / gemm32c
        print(f"| {r['preset']} | {r['dtype']} | {r['step_time']:.3f} | {fmt_g(rate)} | {label}{rate / gemm32:.1%} | "
              f"{vs16} | {label}{cpu_mfu:.1%} | {r['peak_rss_gib']:.2f} |")
    print("\nCPU-time MFU: the same ratio with process CPU seconds in place of wall seconds, for step and GEMM "
          "alike\n(less sensitive to other processes sharing the cores; OpenMP spin-waiting still counts).")
    print("\nstep times (s): " + "; ".join(
        f"{r['preset']} {r['dtype']}: " + ", ".join(f"{t:.3f}" for t in r["step_times"]) for r in results))

    if not args.no_profile:
        print("\n## Time breakdown of one profiled step (s, self time per category; profiler adds overhead)\n")
        for r in results:
            b = r["breakdown"]
            tot = sum(b.values())
            parts = ", ".join(f"{k} {v:.3f} ({v / tot:.0%})" for k, v in b.items() if v / tot >= 0.005)
            print(f"- {r['preset']} {r['dtype']} (total {tot:.3f}): {parts}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(gemm_fp32=gemm32, gemm_bf16=gemm16, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
