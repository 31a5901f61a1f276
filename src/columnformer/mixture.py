"""Weight banks: every column's weights a softmax mixture of E shared experts (between tied and untied).

    W_n = sum_e c[n, e] W_e            static / topo coefficients c (N, E): one mixture per column
    y_nb = sum_e c[n, b, e] (x_nb W_e)  dynamic coefficients c (N, B, E): each column queries the bank
                                        with its state (seed 003's attention over weight matrices)

Coefficients (one :class:`MixtureCoefficients` per block, shared by the block's attention, MLP and
norms, as in the predecessor's ``MixtureCoefficients``):

    static   learned logits per column; c = softmax(exp(s_n) * normalize(logits_n)) with a learned
             per-column log-temperature s_n (CLIP-style, clamped at 100), the predecessor's form
    topo     the logits are a smooth function of the column's position on the sheet: c = softmax(exp(s) *
             cos(pos_n, key_e)), pos_n = fourier(coords_n) A with fixed low-frequency Fourier features of
             the coordinates and a learned A, learned expert keys key_e (TopoMoE-style expert maps)
    dynamic  c = softmax(q_nb . key_e / sqrt(d)), q_nb = layer_norm(x_nb) Wq: input-dependent, optionally
             only the top-k experts per column and sample (renormalised)

E = 1 is a tied layer; E = N with one-hot coefficients is an untied one. Static coefficients mix
the weights (N materialised matrices per call: N*E*in*out multiply-adds, fewer than mixing the
outputs, B*N*E*in*out, for batches B > 2; measured 3.0-19x faster at B = 32-64), except for single samples
and pairs, where the outputs are mixed (:func:`mix_outputs`); dynamic coefficients differ per sample, so the
outputs of the E experts are computed in one GEMM and mixed (no per-column matrices).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import INIT_STD

MODES = ("static", "topo", "dynamic")


class MixtureCoefficients(nn.Module):
    """Mixing coefficients of one block's weight banks; layers read them through :meth:`current`.

    ``update(x)`` (dynamic mode) computes the coefficients of this step's input ``x`` (N, B, C); static
    and topo coefficients do not depend on the input. ``last`` keeps the latest coefficients (detached)
    for the trace: expert load and mixing entropy.
    """

    def __init__(
        self, n: int, dim: int, experts: int, mode: str = "static", coords: np.ndarray | None = None,
        top_k: int | None = None, key_dim: int = 16, fourier: int = 4,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mixture mode must be one of {MODES}, got {mode!r}")
        self.n, self.experts, self.mode, self.top_k = n, experts, mode, top_k
        self._current: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        if mode == "static":
            self.logits = nn.Parameter(torch.empty(n, experts))
            self.scale = nn.Parameter(torch.zeros(n))
        elif mode == "topo":
            if coords is None:
                raise ValueError("topo mixture coefficients need the columns' coordinates")
            feats, freqs = _fourier_features(np.asarray(coords, dtype=np.float64), fourier)
            self.register_buffer("features", feats, persistent=False)
            self.register_buffer("freqs", freqs, persistent=False)
            self.pos = nn.Parameter(torch.empty(self.features.shape[1], key_dim))  # Fourier features -> position code
            self.keys = nn.Parameter(torch.empty(experts, key_dim))
            self.scale = nn.Parameter(torch.zeros(()))
        else:
            self.query = nn.Linear(dim, key_dim, bias=False)
            self.keys = nn.Parameter(torch.empty(experts, key_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.mode == "static":
            nn.init.trunc_normal_(self.logits, std=self.experts**-0.5)
            nn.init.zeros_(self.scale)
        elif self.mode == "topo":  # amplitude ~ 1 / frequency: the initial maps are dominated by long wavelengths
            nn.init.normal_(self.pos, std=1.0)
            with torch.no_grad():
                self.pos.mul_((1 / self.freqs)[:, None] / (1 / self.freqs).norm())
            nn.init.normal_(self.keys, std=1.0)
            nn.init.zeros_(self.scale)
        else:
            nn.init.trunc_normal_(self.query.weight, std=INIT_STD)
            nn.init.normal_(self.keys, std=1.0)

    def static_coefficients(self) -> torch.Tensor:
        """(N, E) coefficients of the static and topo modes."""
        if self.mode == "static":
            scale = self.scale.exp().clamp(max=100)
            return (scale[:, None] * F.normalize(self.logits, dim=1)).softmax(-1)
        pos = self.features @ self.pos  # (N, d) smooth in the coordinates
        sim = F.normalize(pos, dim=1) @ F.normalize(self.keys, dim=1).t()  # (N, E) cosine similarity
        return (self.scale.exp().clamp(max=100) * sim).softmax(-1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Compute this step's coefficients: (N, E) static/topo, (N, B, E) dynamic from x (N, B, C)."""
        if self.mode != "dynamic":
            c = self.static_coefficients()
        else:
            q = self.query(F.layer_norm(x, x.shape[-1:]))  # (N, B, d)
            logits = (q @ self.keys.t().to(q.dtype)).float() / math.sqrt(q.shape[-1])  # (N, B, E)
            if self.top_k is not None and self.top_k < self.experts:
                kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            c = logits.softmax(-1)
        self._current = c
        self.last = c.detach()
        return c

    def current(self) -> torch.Tensor:
        if self._current is None:  # static coefficients used outside a block's forward
            return self.update(None) if self.mode != "dynamic" else _no_update()
        return self._current

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert load (E,): mean coefficient per expert, mixing entropy: mean entropy of the coefficients)."""
        c = self.last.float().reshape(-1, self.experts)
        return c.mean(0), -(torch.special.xlogy(c, c)).sum(-1).mean()

    # ---- the layers this bank makes (layers.linear / layers.layer_norm call these for a mixture)
    def linear(self, in_features: int, out_features: int, bias: bool = True) -> "MixtureLinear":
        return MixtureLinear(self, in_features, out_features, bias)

    def layer_norm(self, dim: int) -> "MixtureLayerNorm":
        return MixtureLayerNorm(self, dim)

    def extra_repr(self) -> str:
        return f"n={self.n}, experts={self.experts}, mode={self.mode}, top_k={self.top_k}"


def _no_update():
    raise RuntimeError("dynamic mixture coefficients are computed by the block from its input; call update(x) first")


def _fourier_features(coords: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2 * count * D) sin/cos of the coordinates at ``count`` frequencies per axis (half a period to
    ``count / 2`` periods over the sheet's extent along that axis, so maps made from them vary smoothly over
    the sheet), and each feature's frequency (2 * count * D,)."""
    lo, hi = coords.min(0), coords.max(0)
    extent = np.where(hi - lo > 0, hi - lo, 1.0)
    u = (coords - lo) / extent  # (N, D) in [0, 1]
    freqs = np.arange(1, count + 1) * 0.5  # half a period to `count / 2` periods over the sheet
    ang = 2 * np.pi * u[:, :, None] * freqs[None, None, :]  # (N, D, count)
    feats = np.concatenate([np.sin(ang), np.cos(ang)], axis=2).reshape(len(coords), -1)
    per_feature = np.broadcast_to(np.concatenate([freqs, freqs])[None, :], (coords.shape[1], 2 * count)).reshape(-1)
    return torch.from_numpy(feats).float(), torch.from_numpy(per_feature.copy()).float()


def mix_outputs(batch: int, experts: int) -> bool:
    """Whether a static bank should mix its experts' outputs (B*E*in*out multiply-adds, no per-column matrices)
    rather than its weights (E*in*out per column to materialise N matrices, then B*in*out per column): when
    B*E < 2 (B + E), i.e. single samples and pairs. Measured (benchmarks/mixture_strategies.py, forward +
    backward, 2 threads, 10 shapes): mixing weights is 3.0-19x faster at B = 32-64 for E = 4-24; at B = 1-2
    mixing outputs takes 0.26-0.81x the time; the rule picks the faster way in all 10."""
    return batch * experts < 2 * (batch + experts)


class MixtureLinear(nn.Module):
    """Linear layer whose per-column weights are a mixture of E experts. (N, B, in) -> (N, B, out)."""

    def __init__(self, coef: MixtureCoefficients, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.coef = [coef]  # a list: the bank is owned by the block, not registered twice
        e = coef.experts
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(e, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(e, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, B, _ = x.shape
        c = self.coef[0].current()
        E, i, o = self.weight.shape
        if c.ndim == 2 and not mix_outputs(B, E):  # static: mix the weights, then one batched matmul
            w = (c.to(x.dtype) @ self.weight.to(x.dtype).reshape(E, i * o)).view(N, i, o)  # (N, in, out)
            y = torch.bmm(x, w)  # (N, B, out)
            return y if self.bias is None else y + (c.to(x.dtype) @ self.bias.to(x.dtype)).unsqueeze(1)
        if c.ndim == 2:  # static, small batch: the same coefficients for every sample
            c = c.unsqueeze(1).expand(N, B, E)  # (N, B, E)
        # mix outputs: every expert's output in one GEMM, mixed per column and sample (no per-column matrices)
        w = self.weight.to(x.dtype).permute(1, 0, 2).reshape(i, E * o)  # (in, E*out)
        y = (x.reshape(N * B, i) @ w).view(N, B, E, o)  # (N, B, E, out)
        c = c.to(x.dtype)
        y = (c.unsqueeze(-1) * y).sum(2)  # (N, B, out)
        return y if self.bias is None else y + c @ self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MixtureLayerNorm(nn.Module):
    """LayerNorm whose per-column affine is a mixture of E experts' affines. (N, B, C) -> (N, B, C)."""

    def __init__(self, coef: MixtureCoefficients, dim: int, eps: float = 1e-5):
        super().__init__()
        self.coef = [coef]
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(coef.experts, dim))
        self.bias = nn.Parameter(torch.zeros(coef.experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coef[0].current().to(x.dtype)  # (N, E) or (N, B, E)
        x = F.layer_norm(x, (self.dim,), eps=self.eps)  # (N, B, C)
        w, b = c @ self.weight.to(x.dtype), c @ self.bias.to(x.dtype)  # (N, C) or (N, B, C)
        if c.ndim == 2:
            w, b = w.unsqueeze(1), b.unsqueeze(1)
        return x * w + b

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, dim={self.dim}"
