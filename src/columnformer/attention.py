"""ColumnAttention: how columns read each other.

One math, several kernels. For every query column q and each of its incoming edges k::

    score[q, k] = <Q_q, K_k> / sqrt(d) + bias[q, k]
    A[q, :]     = softmax over the edges of q
    out[q]      = sum_k A[q, k] V_k
    wiring      = mean over (batch, head, q) of sum_k W[q, k] A[q, k],   W = D**p / mean(D**p)

The dense kernel lists all N x N pairs; the gather kernel (``sparse_attention.py``) visits only
the K edges of each column, the fused kernel (``fused_sparse.py``) does so in one compiled C++
pass per column; the block-sparse kernel (``block_sparse.py``) computes the same K edges
as dense attention between tiles of nearby columns and their key sets (a ``BlockPlan``). Dense or
sparse is decided by the ``Connectivity``; among the sparse kernels the sheet picks (its
``sparse_kernel`` option: ``auto``, or ``gather`` / ``block`` / ``fused``) and passes a
plan when the block kernel is to run; ``flex`` passes a ``FlexPlan``: the same tiles through
FlexAttention on CUDA (``flex_sparse.py``); ``fused`` (and ``auto`` on CPU when it builds) passes a
``FusedPlan``: the gather kernel's math as one compiled C++ pass per column (``fused_sparse.py``).
The wiring cost and the attention entropy are reduced to scalars inside the kernel, so no
attention map is kept unless ``record_attn`` asks for it.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F
from torch import nn

from .attention_stats import AttentionStats
from .block_sparse import BlockPlan, block_sparse_attention
from .flex_sparse import FlexPlan, flex_sparse_attention
from .fused_sparse import FusedPlan, fused_sparse_attention
from .layers import UntiedLinear, linear, untied_linear_fused
from .sparse_attention import sparse_attention


_NULL = contextlib.nullcontext()
COMMUNICATION_MODES = ("attention", "static_mix", "selection", "linmixing")


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
) -> tuple[torch.Tensor, AttentionStats]:
    """The dense math written plainly with autograd (the specification the fast kernel is tested against)."""
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


def _to_bhn(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, B, H, d) -> contiguous (B*H, N, d) in ``dtype`` (one copy, cast included)."""
    N, B, H, d = x.shape
    out = torch.empty(B, H, N, d, dtype=dtype, device=x.device)
    out.copy_(x.permute(1, 2, 0, 3))
    return out.view(B * H, N, d)


class _DenseAttention(torch.autograd.Function):
    """Fused dense attention with the wiring cost and entropy reduced inside the kernel.

    Forward: S = scale * Q K^T + bias (one baddbmm), A = softmax(S), O = A V,
    wiring = sum_{q,k} W[q,k] * sum_{b,h} A[b,h,q,k] / (B*H*N), entropy = -sum A log A / (B*H*N).
    Backward: the softmax backward with the wiring gradient folded into dA (no extra (B,H,N,N) maps).
    Under autocast the three GEMMs run in the autocast dtype; scores, softmax and the statistics in fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, wiring_weight, gemm_dtype):
        ctx.set_materialize_grads(False)  # unused outputs (the map, the entropy) get no zero-filled gradients
        N, B, H, d = q.shape
        dv = v.shape[-1]
        scale = d**-0.5
        acc = torch.promote_types(wiring_weight.dtype, q.dtype)  # fp32 (or fp64) statistics
        qh, kh, vh = _to_bhn(q, gemm_dtype), _to_bhn(k, gemm_dtype), _to_bhn(v, gemm_dtype)
        if gemm_dtype == acc:
            if bias is not None:
                scores = torch.baddbmm(bias.to(acc).expand(B * H, N, N), qh, kh.transpose(1, 2), alpha=scale)
            else:
                scores = torch.bmm(qh * scale, kh.transpose(1, 2))
        else:  # low-precision GEMM, fp32 scores (as autocast: bf16 matmul, then + fp32 bias)
            scores = torch.bmm(qh * scale, kh.transpose(1, 2))
            scores = scores.to(acc) if bias is None else torch.add(scores, bias.to(acc))
        log_attn = torch.log_softmax(scores, dim=-1)  # (BH, N, N)
        del scores
        attn = log_attn.exp()
        denom = B * H * N
        entropy = -torch.vdot(attn.view(-1), log_attn.view(-1)) / denom
        del log_attn
        w = wiring_weight.to(acc)
        wiring = torch.dot(attn.view(B * H, N * N).sum(0), w.reshape(-1)) / denom
        attn_g = attn if gemm_dtype == acc else attn.to(gemm_dtype)
        out = torch.bmm(attn_g, vh)  # (BH, N, dv)
        ctx.save_for_backward(qh, kh, vh, attn, attn_g, w)
        ctx.meta = (N, B, H, d, dv, scale, q.dtype, k.dtype, v.dtype, bias is not None)
        ctx.mark_non_differentiable(entropy, attn)
        out = out.view(B, H, N, dv).permute(2, 0, 1, 3)  # (N, B, H, dv)
        return out, wiring, entropy, attn.view(B, H, N, N)

    @staticmethod
    def backward(ctx, d_out, d_wiring, _d_entropy, _d_attn):
        qh, kh, vh, attn, attn_g, w = ctx.saved_tensors
        N, B, H, d, dv, scale, q_dtype, k_dtype, v_dtype, has_bias = ctx.meta
        gd = qh.dtype
        dq = dk = dvv = dbias = None
        if d_out is not None:
            do = _to_bhn(d_out, gd)  # (BH, N, dv)
            d_attn = torch.bmm(do, vh.transpose(1, 2))  # (BH, N, N)
            if ctx.needs_input_grad[2]:
                dvv = torch.bmm(attn_g.transpose(1, 2), do)
        else:
            d_attn = torch.zeros_like(attn)
        if d_wiring is not None:
            c = d_wiring / (B * H * N)
            if d_attn.dtype == attn.dtype:
                d_attn.add_(w * c)
            else:
                d_attn = torch.add(d_attn, w * c)
        elif d_attn.dtype != attn.dtype:
            d_attn = d_attn.to(attn.dtype)
        d_scores = torch._softmax_backward_data(d_attn, attn, -1, attn.dtype)  # A * (dA - sum(A dA))
        del d_attn
        if has_bias and ctx.needs_input_grad[3]:
            dbias = d_scores.sum(0)
        d_scores = d_scores.to(gd)
        if ctx.needs_input_grad[0]:
            dq = torch.bmm(d_scores, kh).mul_(scale)
            dq = dq.view(B, H, N, d).permute(2, 0, 1, 3).to(q_dtype)
        if ctx.needs_input_grad[1]:
            dk = torch.bmm(d_scores.transpose(1, 2), qh).mul_(scale)
            dk = dk.view(B, H, N, d).permute(2, 0, 1, 3).to(k_dtype)
        if dvv is not None:
            dvv = dvv.view(B, H, N, dv).permute(2, 0, 1, 3).to(v_dtype)
        return dq, dk, dvv, dbias, None, None


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
    Without a mask this runs the fused kernel ``_DenseAttention`` (same math as
    :func:`dense_attention_reference`, fewer passes over the (B, H, N, N) maps).
    """
    if edge_mask is not None or wiring_weight.requires_grad:
        return dense_attention_reference(q, k, v, bias, wiring_weight, edge_mask, record_attn)
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        gemm_dtype = torch.get_autocast_dtype(dev)
    else:
        gemm_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        if bias is not None:
            gemm_dtype = torch.promote_types(gemm_dtype, bias.dtype)
    prof = torch.autograd._profiler_enabled()
    with torch.autograd.profiler.record_function("cf::attention") if prof else _NULL:
        with torch.autocast(dev, enabled=False):
            out, wiring, entropy, attn = _DenseAttention.apply(q, k, v, bias, wiring_weight, gemm_dtype)
    return out, AttentionStats(wiring, entropy.detach(), attn.detach() if record_attn else None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_index: torch.Tensor | None = None,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
    plan: BlockPlan | FlexPlan | FusedPlan | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention restricted to a connectivity's edges; picks the kernel from them.

    ``edge_index``/``edge_mask`` (N, K) come from a sparse ``Connectivity``; ``None`` means all pairs.
    ``plan``: a :class:`~columnformer.block_sparse.BlockPlan` of those edges runs the block-sparse kernel,
    a :class:`~columnformer.flex_sparse.FlexPlan` the FlexAttention backend, a
    :class:`~columnformer.fused_sparse.FusedPlan` the fused C++ kernel (CPU).
    """
    if edge_index is None:
        return dense_attention(q, k, v, bias, wiring_weight, record_attn=record_attn)
    if isinstance(plan, FusedPlan):
        return fused_sparse_attention(q, k, v, bias, wiring_weight, edge_index, edge_mask, record_attn, plan.order)
    if isinstance(plan, FlexPlan):
        out, wiring, entropy, attn = flex_sparse_attention(q, k, v, bias, wiring_weight, plan, edge_index, edge_mask, record_attn)
        return out, AttentionStats(wiring, entropy, attn)
    if plan is not None:
        out, wiring, entropy, attn = block_sparse_attention(q, k, v, bias, wiring_weight, plan, record_attn)
        return out, AttentionStats(wiring, entropy, attn)
    return sparse_attention(q, k, v, bias, wiring_weight, edge_index, edge_mask, record_attn=record_attn)


def linear_mixing(
    v: torch.Tensor,
    weights: torch.Tensor,
    wiring_weight: torch.Tensor,
    edge_index: torch.Tensor | None = None,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
) -> tuple[torch.Tensor, AttentionStats]:
    """Static linear mixing (the predecessor's ``linmixing``): ``out[q] = sum_k weights[q, k] V_k``, no softmax.

    v: (N, B, H, dv); weights: (N, E), or (H, N, E) per head; wiring_weight (N, E); E = N dense or K on the
    edges ``edge_index``. The weights may be negative: the wiring cost is ``mean_{h,q} sum_k W[q, k]
    |weights[h, q, k]|`` and the entropy that of the normalised magnitudes ``|weights| / sum_k |weights|``
    (both independent of the batch).
    """
    N, B, H, dv = v.shape
    per_head = weights.ndim == 3
    w = weights if per_head else weights.unsqueeze(0)  # (1|H, N, E)
    if edge_mask is not None:
        w = w.masked_fill(~edge_mask, 0.0)
    w = w.to(v.dtype)
    if edge_index is None:
        out = torch.einsum("hnm,mbhc->nbhc", w.expand(H, -1, -1), v) if per_head else (w[0] @ v.reshape(N, -1)).view(N, B, H, dv)
    else:  # gathers (N, K, B, H, dv)
        vg = v[edge_index]
        out = torch.einsum("hnk,nkbhc->nbhc", w, vg) if per_head else torch.einsum("nk,nkbhc->nbhc", w[0], vg)
    mag = w.float().abs()
    wiring = (mag * wiring_weight).sum(-1).mean()
    with torch.no_grad():
        p = mag / mag.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -torch.special.xlogy(p, p).sum(-1).mean()
    attn = w.detach().expand(B, H, *w.shape[1:]) if record_attn else None
    return out, AttentionStats(wiring, entropy, attn)


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
        untied: every column owns its query/key (and value/projection) weights (True), shares them
            (False), or takes them from a weight bank (a ``mixture.MixtureCoefficients``).
        edge_shape: shape of the learned per-edge bias, (N, N) dense or (N, K) sparse; None: no bias.
        mode: how the communication weights are made (every kernel, the wiring cost included):
            ``attention`` softmax(Q K^T / sqrt(d) + bias), data-dependent queries and keys;
            ``static_mix`` softmax(bias): the learned per-edge weights alone, no queries or keys;
            ``selection`` a learned static query per column (and head) against data-dependent keys;
            ``linmixing`` the per-edge bias itself as linear weights, no softmax (the predecessor's linmixing).
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
        mode: str = "attention",
        head_bias: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"column width {dim} is not divisible by heads={heads}; pick heads dividing the width")
        if mode not in COMMUNICATION_MODES:
            raise ValueError(f"attention mode must be one of {COMMUNICATION_MODES}, got {mode!r}")
        if mode in ("static_mix", "linmixing") and edge_shape is None:
            raise ValueError(f"mode={mode} weighs the edges by the learned per-edge bias: it needs attn_bias local or zero")
        self.heads, self.qk_dim, self.dim, self.mode = heads, qk_dim, dim, mode
        self.q = linear(n, dim, heads * qk_dim, untied) if mode == "attention" else None
        self.k = linear(n, dim, heads * qk_dim, untied) if mode in ("attention", "selection") else None
        self.query = nn.Parameter(torch.empty(n, heads, qk_dim)) if mode == "selection" else None  # static queries
        if self.query is not None:
            nn.init.trunc_normal_(self.query, std=1.0)
        self.v = linear(n, dim, dim, untied) if value_proj else None
        self.proj = linear(n, dim, dim, untied) if value_proj else None
        self.bias = nn.Parameter(torch.zeros(edge_shape)) if edge_shape is not None else None
        if head_bias and mode != "linmixing":
            raise ValueError("head_bias (per-head edge weights) applies to mode=linmixing")
        self.head_bias = nn.Parameter(torch.zeros(heads, *edge_shape)) if head_bias else None  # (H, N, N|K)

    def forward(
        self,
        x: torch.Tensor,
        wiring_weight: torch.Tensor,
        edge_index: torch.Tensor | None = None,
        edge_mask: torch.Tensor | None = None,
        record_attn: bool = False,
        record_qk: bool = False,
        plan: BlockPlan | FlexPlan | FusedPlan | None = None,
    ) -> tuple[torch.Tensor, AttentionStats, tuple | None]:
        N, B, C = x.shape
        H = self.heads
        v = (self.v(x) if self.v is not None else x).view(N, B, H, C // H)  # (N, B, H, C/H)
        if self.mode == "linmixing":
            weights = self.bias if self.head_bias is None else self.bias + self.head_bias  # (N, E) or (H, N, E)
            out, stats = linear_mixing(v, weights, wiring_weight, edge_index, edge_mask, record_attn)
            q = k = None
        else:
            q, k = self._queries_keys(x)  # (N, B, H, d) each
            out, stats = attention(q, k, v, self.bias, wiring_weight, edge_index, edge_mask, record_attn, plan)
        out = out.reshape(N, B, C)  # (N, B, C)
        if self.proj is not None:
            out = self.proj(out)
        qk = (q.detach().permute(1, 2, 0, 3), k.detach().permute(1, 2, 0, 3)) if record_qk and q is not None else None
        return out, stats, qk

    def _queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, B, _ = x.shape
        H, d = self.heads, self.qk_dim
        if self.mode == "static_mix":  # Q K^T = 0: the scores are the bias alone (d = 1 keeps the kernels' shapes)
            zero = x.new_zeros(1, 1, 1, 1).expand(N, B, H, 1)
            return zero, zero
        if self.mode == "selection":
            k = self.k(x).view(N, B, H, d)
            return self.query.to(k.dtype).unsqueeze(1).expand(N, B, H, d), k
        if isinstance(self.q, UntiedLinear) and isinstance(self.k, UntiedLinear):
            q, k = untied_linear_fused(x, [self.q, self.k])  # one batched matmul inside a session
        else:
            q, k = self.q(x), self.k(x)
        return q.view(N, B, H, d), k.view(N, B, H, d)
