"""How far 8-bit moment codes drift AdamW's updates from float32's, on synthetic gradients (no model, no timing).

    python benchmarks/moment_codes.py                 # ~1 minute on 2 cores

The same gradient stream (16,384 parameters whose gradient scales spread over decades, noisy with a bias, shrinking
over training: g_t = sigma * (N(0, 1) + 0.3) / (1 + t / 300)) feeds exact float32 Adam moments and, step by step,
moments stored in codes of ``columnformer.optim`` (beta1 = 0.9, beta2 = 0.999, 2,000 steps). Printed per design: the
relative error of the summed bias-corrected updates ||sum_t u_q - sum_t u|| / ||sum_t u|| and the 10/50/90 %
quantiles of the stored root of the second moment over float32's at the end. Designs: the first moment as e4m3,
the second moment's root as e4m3 (the first 8-bit design, replaced) or in the logarithmic code (``state_dtype=8bit``),
and the log code with an exact first moment (the root's share of the error).
"""

from __future__ import annotations

import argparse

import torch

from columnformer.optim import BLOCK, dequantize_fp8, dequantize_root, quantize_fp8_, quantize_root_


def _codec(kind: str, n: int):
    """(encode(x) -> state, decode(state) -> x) of a code for n values."""
    if kind == "fp32":
        return (lambda x: x.clone()), (lambda s: s.clone())
    quant, dequant = (quantize_fp8_, dequantize_fp8) if kind == "e4m3" else (quantize_root_, dequantize_root)

    def encode(x):
        codes, scales = torch.empty(n, dtype=torch.uint8), torch.empty(n // BLOCK)
        quant(codes, scales, x.clone())
        return codes, scales

    return encode, (lambda s: dequant(*s))


def drift(m_code: str, root_code: str, n: int = 64 * BLOCK, steps: int = 2000, beta1: float = 0.9,
          beta2: float = 0.999, seed: int = 0) -> tuple[float, list[float]]:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.randn(n, generator=g) * 1.5)
    enc_m, dec_m = _codec(m_code, n)
    enc_r, dec_r = _codec(root_code, n)
    m, v = torch.zeros(n), torch.zeros(n)
    sm, sr = enc_m(torch.zeros(n)), enc_r(torch.zeros(n))
    total, total_q = torch.zeros(n), torch.zeros(n)
    for t in range(1, steps + 1):
        grad = sigma * (torch.randn(n, generator=g) + 0.3) / (1 + t / 300)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        mq = dec_m(sm).lerp_(grad, 1 - beta1)
        vq = dec_r(sr).square_().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        sm, sr = enc_m(mq), enc_r(vq.sqrt())
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        total += (m / bc1) / ((v / bc2).sqrt() + 1e-8)
        total_q += (mq / bc1) / ((vq / bc2).sqrt() + 1e-8)
    ratio = vq.sqrt() / v.sqrt()
    return float((total_q - total).norm() / total.norm()), ratio.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args(argv)
    print("| first moment | root of the second moment | summed-update error | stored root / float32's (10/50/90 %) |")
    print("|---|---|---:|---|")
    for m_code, root_code, note in (("e4m3", "e4m3", " (first design)"), ("e4m3", "log", " (state_dtype=8bit)"),
                                    ("fp32", "log", ""), ("e4m3", "fp32", "")):
        err, q = drift(m_code, root_code, steps=a.steps)
        print(f"| {m_code} | {root_code}{note} | {err:.3f} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} |")


if __name__ == "__main__":
    main()
