"""Wide sheets: the gather, fused and block-sparse kernels (and dense attention) side by side, with a roofline.

    python benchmarks/scale.py                                   # default sweep, markdown table
    python benchmarks/scale.py --ns 1024 4096 16384 65536 131072 262144 --max-n gather=65536 dense=4096 \
        --checkpoint                                             # the run recorded in BENCHMARKS.md

Model: a 2D grid sheet of N columns, untied columns of width 32, one head with query/key dimension 16,
MLP ratio 1, recurrent, 4 steps, ``Connectivity.local(k=64)``; batch 8 of random tokens written into
every column; one training step = forward, backward (loss = mean square output + 0.01 wiring) and an
AdamW step (torch's fused AdamW, as the trainer), fp32. ``gather`` runs ``sparse_kernel=gather``, ``block`` ``sparse_kernel=block``, ``fused``
``sparse_kernel=fused`` (the C++ kernel, built once by the parent before any child runs), ``dense`` all pairs. ``--checkpoint`` adds ``block+ckpt`` rows: the block kernel with activation checkpointing;
``--kinds ... block+ckpt+bf16m`` also stores AdamW's moments in bf16 (``columnformer.optim.AdamW``), ``+8bitm`` in
8 bits (``optim.state_dtype=8bit``);
``+keep`` keeps freed host memory in the child for reuse (``train.keep_host_memory``); ``+cache`` reuses freed large
tensors whole (``train.cache_host_memory``, ``runtime.cache_host_memory``); ``+thp`` starts the
child with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``runtime.with_huge_pages``: malloc's large blocks on
transparent huge pages); ``+chunk`` takes each step with the chunked backward (``columnformer.chunked_backward``: the
per-column weights' gradients chunk by chunk of ``--chunk-columns`` columns, or ``--chunk-rows`` grid rows, each
chunk stepped by the optimizer at once).

Every (kernel, N) runs in a fresh subprocess with the same thread count; its peak memory is the child's
RSS high-water mark (``ru_maxrss`` of that child, from ``os.wait4``), reported per column after
subtracting an import-only child. The step time is that of the last of ``--repeats`` steps (the first
allocates optimizer state); since on a shared VM one step can differ from its neighbours by 30 %, the table also gives
the median of the second half of the steps (``step_median_s``: the first steps fault memory in — with ``+thp`` at
65,536 columns still slower for ~4 steps, as huge pages are assembled) and the JSON keeps every step's time
(``step_times_s``). In the same run the parent measures this machine's fp32 GEMM rate (2048^3
matmul) and memory bandwidth (a STREAM-style triad on 1 GiB); :func:`roofline` turns the analytic useful
FLOPs and minimum bytes of a step into a lower bound on its time and names the limiter. Slopes are
least-squares fits of log(time), log(memory - baseline) against log(N) for N >= 4,096. Dense runs whose
predicted memory exceeds ``--dense-limit-gib`` are refused, not tried. ``--million`` also times building
``Connectivity.local(k=64)`` on a 1000 x 1000 grid (10^6 columns) in a child.

``--device cuda`` runs the children and the rate measurements on the GPU (synchronised timings; memory is
``torch.cuda.max_memory_allocated`` per column instead of RSS) and allows the ``flex`` kind
(``sparse_kernel=flex``, FlexAttention). No GPU was available when this option was written: it is untried.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30


def grid_shape(n: int) -> tuple[int, int]:
    h = 2 ** int(math.floor(math.log2(n) / 2))
    if n % h:
        raise SystemExit(f"N={n} is not a power-of-two-friendly grid size")
    return h, n // h


def predict_dense_bytes(n: int, a) -> float:
    """Rough model of dense peak memory: the (B, H, N, N) attention map is kept per step for
    backward, ~4 more map-sized temporaries live at once, plus (N, N) bias/distance/wiring/Adam."""
    maps = a.batch * a.heads * (a.steps + 4)
    return 4.0 * n * n * (maps + 8) + 4e3 * n * a.width


# ---------------------------------------------------------------------- child side
def child(a) -> dict:
    import torch

    from columnformer import Columnformer, SheetConfig, grid
    from columnformer.connectivity import Connectivity

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    res: dict = {"kind": a.kind, "n": a.n, "threads": torch.get_num_threads(), "device": a.device,
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if "keep" in a.kind.split("+"):  # before any large allocation
        from columnformer.runtime import keep_host_memory

        res["host_memory_kept"] = keep_host_memory()
    if "cache" in a.kind.split("+"):  # before any large allocation
        from columnformer.runtime import cache_host_memory

        res["host_memory_cached"] = cache_host_memory()
    if a.kind == "baseline":
        import columnformer.sparse_attention  # noqa: F401  (import cost only)
        return res
    if a.kind == "million":
        t0 = time.perf_counter()
        conn = Connectivity.local(grid(1000, 1000), a.k)
        res["build_s"] = time.perf_counter() - t0
        res["k"] = conn.k
        return res
    h, w = grid_shape(a.n)
    geo = grid(h, w)
    t0 = time.perf_counter()
    conn = Connectivity.dense(geo) if a.kind == "dense" else Connectivity.local(geo, a.k)
    res["conn_s"] = time.perf_counter() - t0
    kernel, *options = a.kind.split("+")
    cfg = SheetConfig(width=a.width, steps=a.steps, recurrent=True, heads=a.heads, qk_dim=a.qk_dim,
                      mlp_ratio=1.0, untied_attn=True, untied_mlp=True, untied_norm=True,
                      sparse_kernel="auto" if kernel == "dense" else kernel, checkpoint="ckpt" in options)
    model = Columnformer(cfg, geo, conn, input_area="all", output_area="all").to(dev)
    res["params"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    plan = model.block_plan()
    res["plan_s"] = time.perf_counter() - t0
    if plan is not None:
        res["plan"] = plan.describe()
    if "bf16m" in options or "8bitm" in options:  # AdamW moments stored in bf16 / 8 bits (optim.state_dtype)
        from columnformer.optim import AdamW

        opt = AdamW(model.parameters(), lr=1e-3, state_dtype="bf16" if "bf16m" in options else "8bit")
    else:
        # what the trainer uses: torch's fused AdamW (--unfused-adamw: its per-parameter loop, which the runs
        # recorded before that option used)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=None if a.unfused_adamw else True)
    tokens = torch.randn(a.batch, a.n, a.width, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    chunked = "chunk" in options

    def loss_fn():
        out, trace = model(tokens)
        return out.square().mean() + 0.01 * trace.wiring_cost

    if chunked:
        from columnformer.chunked_backward import chunked_step

        if a.chunk_rows:  # bands of a fixed number of grid rows: the same overlap |E| / |S| at every N
            a.chunk_columns = a.chunk_rows * w
        res["chunk_columns"] = a.chunk_columns
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        if chunked:  # the per-column weights' gradients chunk by chunk (columnformer.chunked_backward)
            loss = chunked_step(model, opt, loss_fn, chunk_columns=a.chunk_columns)
        else:
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # as the trainer: no gradients live during the next forward
        sync()
        times.append(time.perf_counter() - t0)
        res["loss"] = float(loss)
    res["step_s"] = times[-1]
    res["step_median_s"] = statistics.median(times[len(times) // 2:])
    res["first_step_s"] = times[0]
    res["step_times_s"] = times
    if dev.type == "cuda":
        res["peak_device_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return res


def run_child(kind: str, n: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n)] + a.passthrough
    env = dict(os.environ)
    if "thp" in kind.split("+"):  # glibc's malloc advises huge pages for its large blocks (read at process start)
        from columnformer.runtime import with_huge_pages

        env = with_huge_pages(env)
    limit = None
    if kind == "dense":
        limit = int((a.dense_limit_gib + 4) * GIB)  # safety net on address space

    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, preexec_fn=preexec)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["?"]
        return {"kind": kind, "n": n, "error": f"exit {proc.returncode}: {tail[0][:160]}", "wall_s": wall}
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_gib"] = usage.ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux
    res["wall_s"] = wall
    return res


OPTIONS = {"ckpt", "bf16m", "8bitm", "keep", "cache", "thp", "chunk"}


def kind_name(kind: str) -> str:
    """Validate ``kernel[+option...]`` for --kinds."""
    kernel, *options = kind.split("+")
    if kernel not in ("gather", "block", "flex", "fused", "dense") or not set(options) <= OPTIONS or \
            {"bf16m", "8bitm"} <= set(options):
        raise argparse.ArgumentTypeError(f"{kind!r}: a kernel (gather, block, flex, fused, dense) and options among "
                                         "ckpt, bf16m or 8bitm, keep, cache, thp, chunk joined by '+'")
    return kind


def fit_slope(xs, ys) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)


# ---------------------------------------------------------------------- roofline
def machine_rates(threads: int, device: str = "cpu") -> dict:
    """This machine's fp32 GEMM rate (2048^3 matmul) and memory bandwidth (STREAM-style triad
    ``a = b + s * c`` on three 1/3 GiB arrays, 3 x 1/3 GiB moved per pass), best of 5, ``threads`` threads
    (on ``device``; CUDA timings synchronised, TF32 as torch's default: off for matmul)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x, y = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
    gemm = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        torch.mm(x, y)
        sync()
        gemm.append(2 * 2048**3 / (time.perf_counter() - t0))
    n = GIB // 3 // 4
    a, b, c = torch.empty(n, device=dev), torch.rand(n, device=dev), torch.rand(n, device=dev)
    triad = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        sync()
        triad.append(3 * 4 * n / (time.perf_counter() - t0))
    return {"gemm_flops": max(gemm[1:]), "triad_bytes_per_s": max(triad[1:]), "threads": torch.get_num_threads()}


def roofline(n: int, params: int, a, rates: dict, state_bytes: int = 8) -> dict:
    """Analytic work of one training step of the benchmark sheet and the lower bound it implies.

    FLOPs count only useful work (multiply-add = 2, training = 3 x forward), per column, sample and step:
    the untied query/key GEMMs 2*C*2*H*d, the untied MLP 2*2*C*hidden, and attention over the K edges only:
    scores 2*K*H*d and weighted values 2*K*C. Bytes are the minimum traffic: every parameter, its gradient
    and both AdamW moments moved once (8 + ``state_bytes`` bytes per parameter: 16 in fp32, 12 with bf16
    moments, 10 with 8-bit moments), and every activation backward needs (per
    column, sample and step: block input, norm1 output, q, k, attention output, residual, norm2 output, MLP
    pre-activation and activation = 7*C + 2*H*d... floats, see ``saved``) written once and read once.
    The bound is max(FLOPs / GEMM rate, bytes / triad bandwidth); the limiter is whichever is larger.
    """
    C, H, d, K = a.width, a.heads, a.qk_dim, a.k
    hidden = C  # MLP ratio 1
    fwd = 2 * C * 2 * H * d + 2 * 2 * C * hidden + 2 * K * H * d + 2 * K * C
    flops = 3 * fwd * n * a.batch * a.steps
    saved = 5 * C + 2 * H * d + 2 * hidden  # x, norm1, attn out, residual, norm2, q, k, MLP pre/post activation
    act_bytes = 2 * 4 * saved * n * a.batch * a.steps
    nbytes = (8 + state_bytes) * params + act_bytes
    t_flops = flops / rates["gemm_flops"]
    t_bytes = nbytes / rates["triad_bytes_per_s"]
    return {"gflop": flops / 1e9, "gbytes": nbytes / 1e9, "bound_s": max(t_flops, t_bytes),
            "limiter": "GEMM rate" if t_flops >= t_bytes else "bandwidth", "t_flops_s": t_flops, "t_bytes_s": t_bytes}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--kinds", nargs="+", default=["gather", "block", "dense"], type=kind_name,
                   help="a kernel (gather, block, flex, dense) and options joined by '+': ckpt activation "
                        "checkpointing, bf16m / 8bitm AdamW moments in bf16 / 8 bits, keep freed host memory kept for reuse "
                        "(train.keep_host_memory), +thp (glibc malloc on huge pages), e.g. block+ckpt+bf16m, gather+keep")
    p.add_argument("--checkpoint", action="store_true", help="also run block+ckpt (activation checkpointing)")
    p.add_argument("--max-n", nargs="+", default=[], metavar="KIND=N",
                   help="largest N to run for a kind, e.g. gather=65536 (its step takes minutes beyond)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--qk-dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="training steps per child; the last is timed")
    p.add_argument("--threads", type=int, default=2, help="torch threads in children and the rate measurements")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (untried: no GPU was available)")
    p.add_argument("--dense-limit-gib", type=float, default=20.0)
    p.add_argument("--million", action="store_true", help="also time local(k) on a 10^6-column grid")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--unfused-adamw", action="store_true",
                   help="torch.optim.AdamW's per-parameter loop instead of its fused kernel (what the trainer uses)")
    p.add_argument("--chunk-columns", type=int, default=8192,
                   help="+chunk: columns per chunk of the chunked backward's pass B (pass A: twice as many)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="+chunk: chunks of this many grid rows instead (chunk columns = rows x grid width)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.passthrough = [
        "--k", str(a.k), "--width", str(a.width), "--heads", str(a.heads), "--qk-dim", str(a.qk_dim),
        "--batch", str(a.batch), "--steps", str(a.steps), "--repeats", str(a.repeats), "--threads", str(a.threads),
        "--device", a.device, "--chunk-columns", str(a.chunk_columns),
    ] + (["--chunk-rows", str(a.chunk_rows)] if a.chunk_rows else []) + (["--unfused-adamw"] if a.unfused_adamw else [])
    if a.child:
        a.kind = a.child
        print(json.dumps(child(a)))
        return
    max_n = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.max_n}
    if a.device.startswith("cuda") and "dense" in a.kinds:
        a.kinds.remove("dense")  # its memory model and RLIMIT_AS guard are for host memory
    if any(kind.split("+")[0] == "flex" for kind in a.kinds) and not a.device.startswith("cuda"):
        p.error("the flex kinds (FlexAttention) run on CUDA only: pass --device cuda (on CPU the sheet runs the "
                "block kernel for sparse_kernel=flex)")
    if a.checkpoint and "block+ckpt" not in a.kinds:
        a.kinds.append("block+ckpt")
    if any(kind.split("+")[0] == "fused" for kind in a.kinds):  # build the C++ kernel once, outside the timings
        from columnformer import fused_sparse

        if not fused_sparse.available():
            p.error(f"the fused kinds need the C++ kernel, which could not be built: {fused_sparse.load_error()}")

    print(f"# sheet: grid, K={a.k} local, width {a.width}, heads {a.heads}, qk {a.qk_dim}, MLP 1, batch {a.batch}, "
          f"{a.steps} recurrent steps, untied, fp32; one AdamW training step; fresh process per run; "
          f"{a.threads} threads; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rates = machine_rates(a.threads, a.device)
    print(f"# this machine, same run: fp32 GEMM (2048^3) {rates['gemm_flops'] / 1e9:.1f} G FLOP/s, "
          f"STREAM-style triad {rates['triad_bytes_per_s'] / 1e9:.1f} GB/s ({rates['threads']} threads)", flush=True)
    results = [{"kind": "machine", **rates}, run_child("baseline", 0, a)]
    base = results[1]["peak_rss_gib"]
    print(f"# baseline RSS (python + torch + columnformer imported): {base:.2f} GiB", flush=True)
    if a.device.startswith("cuda"):
        base = 0.0  # memory columns are the device's max_memory_allocated, nothing to subtract
    print("| N | kernel | step (s) | median step (s) | peak RSS (GiB) | KiB / column | analytic GFLOP | min GB | roofline "
          "bound (s) | step / bound | median / bound | limiter | note |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|", flush=True)
    for n in sorted(a.ns):
        for kind in a.kinds:
            if n > max_n.get(kind, n):
                continue
            if kind == "dense":
                pred = predict_dense_bytes(n, a) / GIB
                if pred > a.dense_limit_gib:
                    results.append({"kind": kind, "n": n, "refused": True, "predicted_gib": pred})
                    print(f"| {n:,} | dense | — | — | — | — | | | | | | | refused: predicted {pred:.0f} GiB > "
                          f"{a.dense_limit_gib:.0f} GiB (N² maps) |", flush=True)
                    continue
            r = run_child(kind, n, a)
            results.append(r)
            if "error" in r:
                print(f"| {n:,} | {kind} | — | — | — | — | | | | | | | failed: {r['error']} |", flush=True)
                continue
            if "peak_device_gib" in r:  # GPU: the device's high-water mark replaces the host RSS
                r["peak_rss_gib"] = r["peak_device_gib"]
            r["kib_per_column"] = (r["peak_rss_gib"] - base) * GIB / n / 1024
            options = kind.split("+")
            r["roofline"] = rl = roofline(n, r["params"], a, rates, 4 if "bf16m" in options else 2 if "8bitm" in options else 8)
            plan = r.get("plan")
            note = ""
            if plan and "tile" in plan:
                note = f"tile {plan['tile']}, {plan.get('key_slots', plan.get('max_key_tiles'))} key slots/tiles"
            print(f"| {n:,} | {kind} | {r['step_s']:.2f} | {r['step_median_s']:.2f} | {r['peak_rss_gib']:.2f} | "
                  f"{r['kib_per_column']:.1f} | {rl['gflop']:.1f} | {rl['gbytes']:.2f} | {rl['bound_s']:.2f} | "
                  f"{r['step_s'] / rl['bound_s']:.1f} | {r['step_median_s'] / rl['bound_s']:.1f} | {rl['limiter']} | "
                  f"{note} |", flush=True)
    print()
    for kind in a.kinds:
        rows = [r for r in results if r.get("kind") == kind and "step_s" in r and r["n"] >= 4096]
        if len(rows) >= 2:
            ns = [r["n"] for r in rows]
            st = fit_slope(ns, [r["step_s"] for r in rows])
            stm = fit_slope(ns, [r["step_median_s"] for r in rows])
            smb = fit_slope(ns, [max(r["peak_rss_gib"] - base, 1e-3) for r in rows])
            big = max(rows, key=lambda r: r["n"])
            per_col = (big["peak_rss_gib"] - base) * GIB / big["n"]
            print(f"{kind}: log-log slope over N >= 4096: time {st:.3f} (last step) / {stm:.3f} (median step), peak "
                  f"RSS minus baseline {smb:.3f}; "
                  f"{per_col / 1024:.1f} KiB per column at N={big['n']:,} -> 10^6 columns ≈ {per_col * 1e6 / GIB:.1f} GiB")
    by = {(r["kind"], r["n"]): r for r in results if "step_s" in r}
    for n in sorted(a.ns):
        for kind in (k for k in a.kinds if k.split("+")[0] in ("block", "flex", "fused")):
            # the same host-memory setting
            same = "+".join(["gather"] + [o for o in kind.split("+")[1:] if o in ("keep", "thp")])
            for ref in dict.fromkeys((same, "gather")):
                if (ref, n) in by and (kind, n) in by:
                    g, b = by[(ref, n)], by[(kind, n)]
                    print(f"N={n:,}: {kind} {g['step_s'] / b['step_s']:.2f}x faster than {ref} "
                          f"({b['step_s']:.2f} s vs {g['step_s']:.2f} s; median steps {b['step_median_s']:.2f} vs "
                          f"{g['step_median_s']:.2f} s: {g['step_median_s'] / b['step_median_s']:.2f}x), peak memory "
                          f"{b['peak_rss_gib']:.2f} vs {g['peak_rss_gib']:.2f} GiB")
        if ("dense", n) in by and ("block", n) in by:
            d, b = by[("dense", n)], by[("block", n)]
            print(f"N={n:,}: block kernel {d['step_s'] / b['step_s']:.1f}x faster than dense attention, "
                  f"{d['peak_rss_gib'] / b['peak_rss_gib']:.1f}x less memory")
    if a.million:
        r = run_child("million", 10**6, a)
        results.append(r)
        if "error" in r:
            print(f"local(k={a.k}) on a 1000x1000 grid: failed ({r['error']})")
        else:
            print(f"local(k={a.k}) on a 1000x1000 grid (10^6 columns): {r['build_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
