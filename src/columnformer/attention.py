"""ColumnAttention: how columns read each other.

One math, two kernels. For every query column q and each of its incoming edges k::

    score[q, k] = <Q_q, K_k> / sqrt(d) + bias[q, k]
    A[q, :]     = softmax over the edges of q
    out[q]      = sum_k A[q, k] V_k
    wiring      = mean over (batch, head, q) of sum_k W[q, k] A[q, k],   W = D**p / mean(D**p)

The dense kernel lists all N x N pairs; the sparse kernel (``sparse_attention.py``) visits only
the K edges of each column. Which one runs is decided by the ``Connectivity``, never by a flag.
The wiring cost and the attention entropy are reduced to scalars inside the kernel, so no
attention map is kept unless ``record_attn`` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import linear


@dataclass
class AttentionStats:
    """What one attention call reports: scalars always, the map only on request."""

    wiring: torch.Tensor  # scalar, differentiable: mean_{b,h,q} sum_k W[q,k] A[q,k]
    entropy: torch.Tensor  # scalar, detached: mean_{b,h,q} of -sum_k A log A
    attn: torch.Tensor | None = None  # (B, H, N, N) dense or (B, H, N, K) sparse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
) -> tuple[torch.Tensor, AttentionStats]:
    """All-pairs attention. q, k: (N, B, H, d); v: (N, B, H, dv); bias, wiring_weight: (N, N).

    ``edge_mask`` (N, N) bool, optional, restricts each query to the listed keys (used to check the
    sparse kernel against dense attention on the same edges). Returns (N, B, H, dv) and stats.
    """
    scale = q.shape[-1] ** -0.5
    qh = q.permute(1, 2, 0, 3)  # (B, H, N, d)
    kh = k.permute(1, 2, 3, 0)  # (B, H, d, N)
    vh = v.permute(1, 2, 0, 3)  # (B, H, N, dv)
    scores = torch.matmul(qh * scale, kh)  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias
    if edge_mask is not None:
        scores = scores.masked_fill(~edge_mask, float("-inf"))
    attn = scores.softmax(dim=-1)  # (B, H, N, N)
    out = torch.matmul(attn, vh).permute(2, 0, 1, 3)  # (N, B, H, dv)
    wiring = (attn * wiring_weight).sum(-1).mean()
    with torch.no_grad():
        entropy = -torch.special.xlogy(attn, attn).sum(-1).mean()
    return out, AttentionStats(wiring, entropy, attn.detach() if record_attn else None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_index: torch.Tensor | None = None,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention restricted to a connectivity's edges; picks the kernel from them.

    ``edge_index``/``edge_mask`` (N, K) come from a sparse ``Connectivity``; ``None`` means all pairs.
    """
    if edge_index is None:
        return dense_attention(q, k, v, bias, wiring_weight, record_attn=record_attn)
    from .sparse_attention import sparse_attention  # the sparse kernel lives in its own module

    return sparse_attention(q, k, v, bias, wiring_weight, edge_index, edge_mask, record_attn=record_attn)


def local_bias_init(dist: torch.Tensor, sigma: float = 2.0, min_value: float = -8.0) -> torch.Tensor:
    """The predecessor's local attention-bias initialisation: ``clamp(-d^2 / (2 sigma^2), min)``."""
    return torch.clamp(-(dist**2) / (2 * sigma**2), min=min_value)


class ColumnAttention(nn.Module):
    """Multi-head attention between the columns of one sheet.

    Args:
        n: number of columns N.
        dim: column width C.
        heads: attention heads H.
        qk_dim: query/key dimension per head.
        value_proj: learn value and output projections; if False the value is the column's
            (normalised) input split across heads, as in the seed README, and C % H must be 0.
        untied: every column owns its query/key (and value/projection) weights.
        edge_shape: shape of the learned per-edge bias, (N, N) dense or (N, K) sparse; None: no bias.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        heads: int = 1,
        qk_dim: int = 64,
        value_proj: bool = False,
        untied: bool = True,
        edge_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"column width {dim} is not divisible by heads={heads}; pick heads dividing the width")
        self.heads, self.qk_dim, self.dim = heads, qk_dim, dim
        self.q = linear(n, dim, heads * qk_dim, untied)
        self.k = linear(n, dim, heads * qk_dim, untied)
        self.v = linear(n, dim, dim, untied) if value_proj else None
        self.proj = linear(n, dim, dim, untied) if value_proj else None
        self.bias = nn.Parameter(torch.zeros(edge_shape)) if edge_shape is not None else None

    def forward(
        self,
        x: torch.Tensor,
        wiring_weight: torch.Tensor,
        edge_index: torch.Tensor | None = None,
        edge_mask: torch.Tensor | None = None,
        record_attn: bool = False,
        record_qk: bool = False,
    ) -> tuple[torch.Tensor, AttentionStats, tuple | None]:
        N, B, C = x.shape
        H = self.heads
        q = self.q(x).view(N, B, H, self.qk_dim)  # (N, B, H, d)
        k = self.k(x).view(N, B, H, self.qk_dim)  # (N, B, H, d)
        v = (self.v(x) if self.v is not None else x).view(N, B, H, C // H)  # (N, B, H, C/H)
        out, stats = attention(q, k, v, self.bias, wiring_weight, edge_index, edge_mask, record_attn)
        out = out.reshape(N, B, C)  # (N, B, C)
        if self.proj is not None:
            out = self.proj(out)
        qk = (q.detach().permute(1, 2, 0, 3), k.detach().permute(1, 2, 0, 3)) if record_qk else None
        return out, stats, qk
