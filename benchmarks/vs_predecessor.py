"""Side by side with the predecessor: one training step of each tiny pair, in one process, on the same batch.

    python benchmarks/vs_predecessor.py /path/to/columnformers            # 3 invocations, median ratio
    python benchmarks/vs_predecessor.py /path/to/columnformers --invocations 1 --pairs rec --dtypes bf16

PATH is a checkout of clane9/columnformers (its ``src/columnformers`` is imported from there; nothing of it
is copied here). The predecessor needs timm: ``pip install --no-deps timm==1.0.3`` in this library's environment (or
``PYTHONPATH=<a --target dir>``). timm's own ``__init__`` imports torchvision, which has no CPU build for
torch 2.13 here; ``load_timm_layers`` then loads the three timm files the predecessor uses, unchanged.
Without PATH, or without timm, the script says why and exits 0 (a clean skip).

Pairs (the predecessor's registered model <-> our predecessor-equivalent preset):

    vit  vision_transformer_tiny_patch16_128      <-> vit-tiny
    ff   vision_columnformer_ff_tiny_patch16_128  <-> columnformer-ff-tiny
    rec  vision_columnformer_r_tiny_patch16_128   <-> columnformer-rec-tiny

Fairness: our model is loaded with the predecessor's weights (``predecessor.convert_state_dict``) and the
logits are compared first; both get the same batch (32 random 128x128 images, fixed labels), the same loss
(cross-entropy + 0.01 x wiring cost: the predecessor's ``L1WiringCost``, ours from the trace), the same
``AdamW(fused=True)`` settings, the same threads and dtype (fp32, or bf16 autocast on both), no
``torch.compile``. Steps of the two models alternate in blocks (``--blocks`` blocks of ``--per-block`` steps
each; the first step of every block is dropped), so drifts in machine speed hit both alike. Each invocation
runs in a fresh child process; the reported ratio is the median over invocations of
(predecessor median step time) / (our median step time).

The floor printed beside each row is what the step would cost if it were only its GEMMs at this machine's
large-GEMM rate (model FLOPs of ``benchmarks/train_step.py``, measured fp32 or bf16 rate) plus one fused
AdamW pass over the parameters (timed alone in the same process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

PAIRS = {
    "vit": ("vision_transformer_tiny_patch16_128", "vit-tiny"),
    "ff": ("vision_columnformer_ff_tiny_patch16_128", "columnformer-ff-tiny"),
    "rec": ("vision_columnformer_r_tiny_patch16_128", "columnformer-rec-tiny"),
}
TARGETS = {("rec", "fp32"): 1.5, ("ff", "fp32"): 1.5, ("vit", "fp32"): 0.97, ("rec", "bf16"): 1.6}
BATCH, LAMBDA = 32, 0.01
TIMM = ""


def load_timm_layers() -> str:
    """Make ``timm.layers`` importable for the predecessor; returns how.

    timm's package ``__init__`` imports torchvision, which has no CPU build for the torch this library is
    measured with. The predecessor uses only ``timm.layers``' ``trunc_normal_``, ``to_2tuple``/``to_3tuple``
    and ``PatchEmbed``; when the full import fails they are loaded from timm's own files (unchanged) without
    running the package ``__init__``s.
    """
    import importlib
    import importlib.util

    global TIMM
    if TIMM:
        return TIMM
    try:
        import timm
        import timm.layers  # noqa: F401

        TIMM = f"timm {timm.__version__} (full import)"
        return TIMM
    except ImportError:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (pip install --no-deps timm==1.0.3)")
    root = Path(list(spec.submodule_search_locations)[0])
    timm = types.ModuleType("timm")
    timm.__path__ = [str(root)]
    layers = types.ModuleType("timm.layers")
    layers.__path__ = [str(root / "layers")]
    sys.modules["timm"], sys.modules["timm.layers"], timm.layers = timm, layers, layers
    weight_init = importlib.import_module("timm.layers.weight_init")
    patch_embed = importlib.import_module("timm.layers.patch_embed")
    importlib.import_module("timm.layers.helpers")
    layers.trunc_normal_, layers.PatchEmbed = weight_init.trunc_normal_, patch_embed.PatchEmbed
    version = (root / "version.py").read_text().split("=")[-1].strip().strip("'\"")
    TIMM = f"timm {version} (timm.layers.weight_init / helpers / patch_embed, without timm's __init__)"
    return TIMM


def import_predecessor(checkout: Path):
    """The predecessor's model modules, imported from a checkout (its package __init__ needs an installed copy)."""
    load_timm_layers()
    src = checkout / "src"
    sys.path.insert(0, str(src))
    pkg = types.ModuleType("columnformers")
    pkg.__path__ = [str(src / "columnformers")]
    sys.modules["columnformers"] = pkg
    from columnformers import losses
    from columnformers.models import registry

    return registry, losses


def why_skip(checkout: str | None) -> str | None:
    if not checkout:
        return "no predecessor checkout given (usage: vs_predecessor.py PATH)"
    if not (Path(checkout) / "src" / "columnformers" / "models" / "columnformer.py").is_file():
        return f"{checkout!r} is not a clane9/columnformers checkout (no src/columnformers/models/columnformer.py)"
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        return "the predecessor needs timm in this environment (pip install --no-deps timm==1.0.3)"
    return None


def gemm_rate(dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


def make_optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=True)


def optimizer_pass_time(model, reps: int = 5) -> float:
    """One fused AdamW step over the model's parameters (gradients present), timed alone."""
    import torch

    opt = make_optimizer(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    return statistics.median(ts)


def run_pair(
    pair: str, dtype: str, checkout: Path, blocks: int, per_block: int, threads: int, verbose: bool = False
) -> dict:
    import torch
    import torch.nn.functional as F

    from columnformer import build_model
    from columnformer.predecessor import convert_state_dict

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import model_flops

    registry, losses = import_predecessor(checkout)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pred_name, preset = PAIRS[pair]
    pred = registry.create_model(pred_name)
    ours = build_model(preset)
    ours.load_state_dict(convert_state_dict(pred.state_dict(), ours))
    wiring = losses.L1WiringCost(pred.geometry, lambd=LAMBDA)
    images = torch.randn(BATCH, 3, 128, 128)
    labels = torch.randint(0, 100, (BATCH,))
    with torch.no_grad():
        ref, _ = pred(images)
        got, _ = ours(images)
    logits_rel = float((got - ref).norm() / ref.norm())
    bf16 = dtype == "bf16"

    def step_fn(model, opt, is_pred):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if is_pred:
                    logits, state = model(images)
                    loss = F.cross_entropy(logits.float(), labels) + wiring(None, logits, state)
                else:
                    logits, trace = model(images)
                    loss = F.cross_entropy(logits.float(), labels) + LAMBDA * trace.wiring_cost
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    rate_before = gemm_rate(torch.bfloat16 if bf16 else torch.float32)
    steps = {"predecessor": step_fn(pred, make_optimizer(pred), True), "ours": step_fn(ours, make_optimizer(ours), False)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(blocks):
        for who, step in steps.items():
            for i in range(per_block):
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
                if i > 0:  # the first step of a block warms caches after the other model ran
                    times[who].append(dt)
                if verbose:
                    print(f"{pair} {dtype} {who} step {i}: {dt:.3f} s", file=sys.stderr, flush=True)
    rate = max(rate_before, gemm_rate(torch.bfloat16 if bf16 else torch.float32))  # the faster of before / after
    train_flops = 3 * sum(model_flops(ours, BATCH).values())
    opt_time = optimizer_pass_time(ours)
    med = {who: statistics.median(t) for who, t in times.items()}
    return dict(
        pair=pair, dtype=dtype, preset=preset, predecessor=pred_name, logits_rel_diff=logits_rel,
        times=times, median=med, ratio=med["predecessor"] / med["ours"], gemm_rate=rate,
        floor=train_flops / rate + opt_time, floor_gemm=train_flops / rate, floor_opt=opt_time,
        threads=threads, torch=torch.__version__, timm=TIMM, load=os.getloadavg()[0],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", nargs="?", help="path of a clane9/columnformers checkout")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--invocations", type=int, default=3, help="fresh child processes; the median ratio is reported")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per model")
    ap.add_argument("--per-block", type=int, default=3, help="steps per block (the first is dropped)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--verbose", action="store_true", help="print every step time (stderr)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    reason = why_skip(args.checkout)
    if reason:
        print(f"skipped: {reason}")
        return 0
    checkout = Path(args.checkout).resolve()
    if args.per_block < 2:
        ap.error("--per-block must be >= 2 (the first step of each block is dropped)")
    if args.child:
        if "bf16" in args.dtypes:
            import torch

            torch.set_num_threads(args.threads)
            r32, r16 = gemm_rate(torch.float32, reps=3), gemm_rate(torch.bfloat16, n=512, reps=3)
            if r16 < r32 / 4:  # no native bf16 GEMM (e.g. no AVX-512 BF16 / AMX): a bf16 comparison means nothing
                print(f"bf16 skipped: this CPU's bf16 GEMM runs at {r16 / 1e9:.2f} G FLOP/s vs fp32 {r32 / 1e9:.1f} "
                      "(no native bf16 kernels)", file=sys.stderr)
                args.dtypes = [d for d in args.dtypes if d != "bf16"]
        res = [
            run_pair(p, d, checkout, args.blocks, args.per_block, args.threads, args.verbose)
            for p in args.pairs for d in args.dtypes
        ]
        print(json.dumps(res))
        return 0

    runs = []
    for i in range(args.invocations):
        cmd = [sys.executable, __file__, str(checkout), "--child", "--pairs", *args.pairs, "--dtypes", *args.dtypes,
               "--blocks", str(args.blocks), "--per-block", str(args.per_block), "--threads", str(args.threads)]
        cmd += ["--verbose"] if args.verbose else []
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE, text=True)
        if out.returncode != 0:
            print((out.stderr or "")[-3000:], file=sys.stderr)
            print(f"invocation {i + 1} failed (exit {out.returncode})", file=sys.stderr)
            return 1
        for line in (out.stderr or "").splitlines():
            if line.startswith("bf16 skipped"):
                print(line)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"invocation {i + 1}/{args.invocations} done; 1-min load average {os.getloadavg()[0]:.2f}", flush=True)

    first = runs[0][0]
    print(f"\ntorch {first['torch']}, {first['timm']}, {args.threads} threads, {os.cpu_count()} CPUs; batch {BATCH}, AdamW(fused=True), "
          f"loss = CE + {LAMBDA} x wiring; {args.blocks} blocks x {args.per_block} steps per model "
          f"(first of each block dropped), {args.invocations} invocations\n")
    print("| pair | dtype | predecessor step (s) | ours (s) | speed-up (median of invocations) | per invocation "
          "| target | our floor (s): GEMMs + AdamW | ours / floor | logits rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    summary = []
    for j, r0 in enumerate(runs[0]):
        rows = [run[j] for run in runs]
        ratios = [r["ratio"] for r in rows]
        ratio = statistics.median(ratios)
        pred_t = statistics.median(r["median"]["predecessor"] for r in rows)
        our_t = statistics.median(r["median"]["ours"] for r in rows)
        floor = statistics.median(r["floor"] for r in rows)
        target = TARGETS.get((r0["pair"], r0["dtype"]))
        mark = "-" if target is None else f">= {target:.2f}x: {'met' if ratio >= target else 'NOT met'}"
        if target is not None:
            verdicts.append(ratio >= target)
        print(f"| {r0['pair']} ({r0['preset']}) | {r0['dtype']} | {pred_t:.3f} | {our_t:.3f} | **{ratio:.2f}x** | "
              + ", ".join(f"{x:.2f}" for x in ratios)
              + f" | {mark} | {floor:.3f} ({statistics.median(r['floor_gemm'] for r in rows):.3f} + "
              f"{statistics.median(r['floor_opt'] for r in rows):.3f}) | {our_t / floor:.2f} | "
              f"{max(r['logits_rel_diff'] for r in rows):.1e} |")
        summary.append(dict(pair=r0["pair"], dtype=r0["dtype"], ratio=ratio, ratios=ratios, target=target,
                            predecessor_s=pred_t, ours_s=our_t, floor_s=floor))
    loads = [r["load"] for run in runs for r in run]
    print(f"\n1-min load average during the pairs: {min(loads):.2f}-{max(loads):.2f}")
    if verdicts:
        print(f"targets met: {sum(verdicts)}/{len(verdicts)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
