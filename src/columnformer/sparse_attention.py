"""Sparse attention kernel: every column attends over its K incoming edges only.

Same math as :func:`columnformer.attention.dense_attention`, restricted to the edges of a sparse
:class:`~columnformer.connectivity.Connectivity` (padded index (N, K) + validity mask)::

    score[q, e] = <Q_q, K_{index[q, e]}> / sqrt(d) + bias[q, e]      (-inf where mask[q, e] is False)
    A[q, :]     = softmax over the K edges of q
    out[q]      = sum_e A[q, e] V_{index[q, e]}
    wiring      = mean over (batch, head, q) of sum_e W[q, e] A[q, e]
    entropy     = mean over (batch, head, q) of -sum_e A log A          (detached)

Memory is O(B*H*N*K) plus the inputs, never O(N^2):

* query columns are processed in chunks, so the gathered keys/values of one chunk
  (chunk x K x B x H x d) bound the peak temporary memory (``CHUNK_ELEMENTS``);
* it is a custom :class:`torch.autograd.Function`: backward saves only q, k, v, the edge index/mask,
  the bias and wiring weight, and the (N, K, B, H) attention probabilities. The gathered
  B x N x K x C keys and values are recomputed chunk by chunk in backward, never stored.

Scores, softmax and all reductions run in float32 (or float64 for float64 inputs) whatever the
input dtype, so bf16 autocast inputs work; the output has the inputs' dtype, as the dense kernel's
matmuls would give under autocast.

GPU note: this is plain PyTorch (index_select / index_add_), so it runs on CUDA unchanged, but it
is not a fused kernel; a FlexAttention / block-sparse path is not implemented here (no GPU was
available to develop and test it).
"""

from __future__ import annotations

import torch

from .attention import AttentionStats

# Upper bound on the elements of one gathered (chunk, K, B, H, d) tensor; a few such tensors live
# at once inside a chunk. 2^22 float32 elements = 16 MiB.
CHUNK_ELEMENTS = 1 << 22


def _chunk_size(n: int, per_column: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(1, per_column)))


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, wiring_weight, index, mask, chunk):
        N, B, H, d = q.shape
        K = index.shape[1]
        dv = v.shape[-1]
        cdt = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)  # compute dtype
        scale = d**-0.5
        k2 = k.reshape(N, B * H * d)
        v2 = v.reshape(N, B * H * dv)
        out = torch.empty(N, B, H, dv, dtype=cdt, device=q.device)
        probs = torch.empty(N, K, B, H, dtype=cdt, device=q.device)
        wiring = torch.zeros((), dtype=cdt, device=q.device)
        entropy = torch.zeros((), dtype=cdt, device=q.device)
        step = chunk or _chunk_size(N, K * B * H * max(d, dv))
        with torch.autocast(q.device.type, enabled=False):
            for s in range(0, N, step):
                e = min(N, s + step)
                c = e - s
                flat = index[s:e].reshape(-1)
                kg = k2.index_select(0, flat).view(c, K, B, H, d)
                scores = (kg.to(cdt) * q[s:e].to(cdt).unsqueeze(1)).sum(-1) * scale  # (c, K, B, H)
                del kg
                if bias is not None:
                    scores = scores + bias[s:e].to(cdt)[:, :, None, None]
                if mask is not None:
                    scores = scores.masked_fill(~mask[s:e, :, None, None], float("-inf"))
                p = torch.softmax(scores, dim=1)  # (c, K, B, H)
                del scores
                probs[s:e] = p
                vg = v2.index_select(0, flat).view(c, K, B, H, dv)
                out[s:e] = (p.unsqueeze(-1) * vg.to(cdt)).sum(1)  # (c, B, H, dv)
                del vg
                wiring += (p * wiring_weight[s:e].to(cdt)[:, :, None, None]).sum()
                entropy -= torch.special.xlogy(p, p).sum()
        denom = N * B * H
        wiring = wiring / denom
        entropy = entropy / denom
        ctx.save_for_backward(q, k, v, bias, wiring_weight, index, mask, probs)
        ctx.chunk = step
        ctx.mark_non_differentiable(entropy, probs)
        return out.to(torch.promote_types(q.dtype, v.dtype)), wiring, entropy, probs

    @staticmethod
    def backward(ctx, g_out, g_wiring, _g_entropy, _g_probs):
        q, k, v, bias, wiring_weight, index, mask, probs = ctx.saved_tensors
        N, B, H, d = q.shape
        K = index.shape[1]
        dv = v.shape[-1]
        cdt = probs.dtype
        scale = d**-0.5
        k2 = k.reshape(N, B * H * d)
        v2 = v.reshape(N, B * H * dv)
        need_q, need_k, need_v, need_bias, need_w = ctx.needs_input_grad[:5]
        dq = torch.zeros(N, B, H, d, dtype=cdt, device=q.device) if need_q else None
        dk = torch.zeros(N, B * H * d, dtype=cdt, device=q.device) if need_k else None
        dvv = torch.zeros(N, B * H * dv, dtype=cdt, device=q.device) if need_v else None
        dbias = torch.zeros(N, K, dtype=cdt, device=q.device) if need_bias else None
        gw = None
        if g_wiring is not None:
            gw = g_wiring.to(cdt) / (N * B * H)
        dw = torch.zeros(N, K, dtype=cdt, device=q.device) if (need_w and gw is not None) else None
        if g_out is None:
            g_out = torch.zeros(N, B, H, dv, dtype=cdt, device=q.device)
        step = ctx.chunk
        with torch.autocast(q.device.type, enabled=False):
            for s in range(0, N, step):
                e = min(N, s + step)
                c = e - s
                flat = index[s:e].reshape(-1)
                p = probs[s:e]  # (c, K, B, H)
                go = g_out[s:e].to(cdt).unsqueeze(1)  # (c, 1, B, H, dv)
                vg = v2.index_select(0, flat).view(c, K, B, H, dv).to(cdt)
                dp = (vg * go).sum(-1)  # (c, K, B, H)
                del vg
                if gw is not None:
                    dp = dp + gw * wiring_weight[s:e].to(cdt)[:, :, None, None]
                    if dw is not None:
                        dw[s:e] = gw * p.sum((2, 3))
                ds = p * (dp - (p * dp).sum(1, keepdim=True))  # (c, K, B, H); 0 on masked edges
                del dp
                if dbias is not None:
                    dbias[s:e] = ds.sum((2, 3))
                if dvv is not None:
                    dvv.index_add_(0, flat, (p.unsqueeze(-1) * go).reshape(c * K, B * H * dv))
                if dq is not None:
                    kg = k2.index_select(0, flat).view(c, K, B, H, d).to(cdt)
                    dq[s:e] = (ds.unsqueeze(-1) * kg).sum(1) * scale
                    del kg
                if dk is not None:
                    dkg = (ds * scale).unsqueeze(-1) * q[s:e].to(cdt).unsqueeze(1)  # (c, K, B, H, d)
                    dk.index_add_(0, flat, dkg.reshape(c * K, B * H * d))
                    del dkg
        return (
            dq.to(q.dtype) if dq is not None else None,
            dk.view(N, B, H, d).to(k.dtype) if dk is not None else None,
            dvv.view(N, B, H, dv).to(v.dtype) if dvv is not None else None,
            dbias.to(bias.dtype) if dbias is not None else None,
            dw.to(wiring_weight.dtype) if dw is not None else None,
            None,
            None,
            None,
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_index: torch.Tensor,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention over the K incoming edges of every column.

    Args:
        q, k: (N, B, H, d) queries and keys; v: (N, B, H, dv) values.
        bias: (N, K) learned per-edge bias or None; wiring_weight: (N, K) W on the edges.
        edge_index: (N, K) long, source column of each edge; edge_mask: (N, K) bool, False on padding
            (None: all edges valid). Every column needs at least one valid edge.
        record_attn: also return the attention map, (B, H, N, K) (detached).
        chunk: query columns per chunk (default: bounded by ``CHUNK_ELEMENTS``).

    Returns (out (N, B, H, dv), AttentionStats(wiring, entropy, attn)).
    """
    N, B, H, d = q.shape
    if edge_index.dim() != 2 or edge_index.shape[0] != N:
        raise ValueError(f"edge_index must be (N={N}, K), got {tuple(edge_index.shape)}")
    K = edge_index.shape[1]
    if wiring_weight.shape != (N, K):
        raise ValueError(f"wiring_weight must be (N, K) = {(N, K)}, got {tuple(wiring_weight.shape)}")
    if bias is not None and bias.shape != (N, K):
        raise ValueError(f"attention bias must be (N, K) = {(N, K)} for a sparse connectivity, got {tuple(bias.shape)}")
    if edge_mask is not None and edge_mask.all():
        edge_mask = None  # nothing to mask: skip the masked_fill
    out, wiring, entropy, probs = _SparseAttention.apply(
        q, k, v, bias, wiring_weight, edge_index.long(), edge_mask, chunk
    )
    attn = probs.permute(2, 3, 0, 1) if record_attn else None  # (B, H, N, K), float32 (or float64)
    return out, AttentionStats(wiring, entropy, attn)
