"""Does bf16 autocast train like fp32? The digits preset on scikit-learn digits, same seed, both ways.

    python benchmarks/bf16_digits.py                 # 200 steps, batch 64, AdamW lr 2e-3
    python benchmarks/bf16_digits.py --steps 400 --every 40

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, pixel values / 16), a fixed seeded split of
1,437 train / 360 test images. Both runs use the same initial weights and the same batch order; the
only difference is ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass. Prints the
training loss (mean over each window of ``--every`` steps) of both runs side by side, and the final
test accuracies.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def load(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (M, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = 360
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def train(bf16: bool, steps: int, batch: int, lr: float, every: int, seed: int, data):
    from columnformer import build_model

    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build_model("digits")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses, window = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(xtr[idx])
            loss = F.cross_entropy(logits.float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if (step + 1) % every == 0:
            losses.append(sum(window) / len(window))
            window = []
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        acc = (model(xte)[0].argmax(-1) == yte).float().mean().item()
    return losses, acc, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.seed)
    l32, a32, t32 = train(False, args.steps, args.batch, args.lr, args.every, args.seed, data)
    l16, a16, t16 = train(True, args.steps, args.batch, args.lr, args.every, args.seed, data)
    print(f"digits preset, {args.steps} steps, batch {args.batch}, AdamW lr {args.lr}, seed {args.seed}\n")
    print("| steps | fp32 loss | bf16 loss | difference |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(l32, l16)):
        print(f"| {(i) * args.every + 1}-{(i + 1) * args.every} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    print(f"\nfinal test accuracy (360 images): fp32 {a32:.2%}, bf16 {a16:.2%}")
    print(f"wall time: fp32 {t32:.1f} s, bf16 {t16:.1f} s")


if __name__ == "__main__":
    main()
