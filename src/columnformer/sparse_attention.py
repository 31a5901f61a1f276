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
  (B x H x chunk x K x d) bound the peak temporary memory (``CHUNK_ELEMENTS``); inside a chunk the
  scores and the weighted sum of values are batched matmuls over (B*H, chunk);
* it is a custom :class:`torch.autograd.Function`: backward saves only q, k, v, the edge index/mask,
  the bias and wiring weight, and the (B*H, N, K) attention probabilities. The gathered
  B x N x K x C keys and values are recomputed chunk by chunk in backward, never stored;
* backward has no scatter-add: a first pass over reading columns gives dS, dq and the bias
  gradient; a second pass over source columns gathers, for each column, the edges leaving it
  (``reverse_edges``, an inverted edge table cached per edge buffer) to form dk and dv.

Scores, softmax and all reductions run in float32 (or float64 for float64 inputs) whatever the
input dtype, so bf16 autocast inputs work; the output has the inputs' dtype, as the dense kernel's
matmuls would give under autocast.

GPU note: this is plain PyTorch (index_select / index_add_), so it runs on CUDA unchanged, but it
is not a fused kernel. For local connectivity the block-sparse kernel (``block_sparse.py``) computes
the same edges with dense tile matmuls; this gather kernel remains for irregular edge sets.
"""

from __future__ import annotations

import torch

from .attention_stats import AttentionStats

# Upper bound on the elements of one gathered (chunk, K, B, H, d) tensor; a few such tensors live
# at once inside a chunk. 2^22 float32 elements = 16 MiB.
CHUNK_ELEMENTS = 1 << 22


def _chunk_size(n: int, per_column: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(1, per_column)))


_REVERSE_CACHE: list = []  # [(index, mask, versions, (rev, qry))], most recent last
_REVERSE_CACHE_SIZE = 2  # entries hold (N, K) tensors: keep few


def reverse_edges(index: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The outgoing edges of every source column, for gather-only backward passes.

    Returns ``rev`` (N, R) long: flat ids ``q * K + slot`` of the valid edges leaving each column,
    padded with the dummy id N*K; and ``qry`` (N, R): the reading column of each (0 on padding).
    R is the largest out-degree. Cached per (index, mask) tensor object and version, so a sheet's
    edge buffers are inverted once, and again only after ``rewire_sheet`` writes into them.
    """
    versions = (index._version, None if mask is None else mask._version)
    for entry in _REVERSE_CACHE:
        if entry[0] is index and entry[1] is mask and entry[2] == versions:
            return entry[3]
    N, K = index.shape
    flat = index.reshape(-1)
    eid = torch.arange(N * K, device=index.device)
    if mask is not None:
        valid = mask.reshape(-1)
        flat, eid = flat[valid], eid[valid]
    order = torch.argsort(flat, stable=True)
    src, eid = flat[order], eid[order]
    counts = torch.bincount(src, minlength=N)
    R = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(src), device=index.device) - starts[src]
    rev = torch.full((N, R), N * K, dtype=torch.long, device=index.device)
    rev[src, pos] = eid
    qry = torch.where(rev < N * K, rev // K, 0)
    _REVERSE_CACHE.append((index, mask, versions, (rev, qry)))
    del _REVERSE_CACHE[:-_REVERSE_CACHE_SIZE]
    return rev, qry


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, B, H, d) -> contiguous (B*H, N, d) in ``dtype``."""
    N, B, H, d = x.shape
    return x.permute(1, 2, 0, 3).reshape(B * H, N, d).to(dtype).contiguous()


def _columns_first(x: torch.Tensor, B: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """(B*H, N, d) -> contiguous (N, B, H, d) in ``dtype``."""
    BH, N, d = x.shape
    return x.view(B, H, N, d).permute(2, 0, 1, 3).contiguous().to(dtype)


class _SparseAttention(torch.autograd.Function):
    """Layout inside: heads first, (B*H, N, .), so every chunk is a batched matmul over (B*H, chunk)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, wiring_weight, index, mask, chunk):
        N, B, H, d = q.shape
        K = index.shape[1]
        dv = v.shape[-1]
        BH = B * H
        cdt = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)  # compute dtype
        scale = d**-0.5
        out = torch.empty(BH, N, dv, dtype=cdt, device=q.device)
        probs = torch.empty(BH, N, K, dtype=cdt, device=q.device)
        wiring = torch.zeros((), dtype=cdt, device=q.device)
        entropy = torch.zeros((), dtype=cdt, device=q.device)
        step = chunk or _chunk_size(N, K * BH * max(d, dv))
        with torch.autocast(q.device.type, enabled=False):
            qt, kt, vt = (_heads_first(x, cdt) for x in (q, k, v))
            for s in range(0, N, step):
                e = min(N, s + step)
                c = e - s
                flat = index[s:e].reshape(-1)
                kg = kt.index_select(1, flat).view(BH, c, K, d)
                scores = torch.matmul(kg, qt[:, s:e, :, None]).squeeze(-1) * scale  # (BH, c, K)
                del kg
                if bias is not None:
                    scores = scores + bias[s:e].to(cdt)
                if mask is not None:
                    scores = scores.masked_fill(~mask[s:e], float("-inf"))
                p = torch.softmax(scores, dim=-1)  # (BH, c, K)
                del scores
                probs[:, s:e] = p
                vg = vt.index_select(1, flat).view(BH, c, K, dv)
                out[:, s:e] = torch.matmul(p.unsqueeze(-2), vg).squeeze(-2)  # (BH, c, dv)
                del vg
                wiring += (p * wiring_weight[s:e].to(cdt)).sum()
                entropy -= torch.special.xlogy(p, p).sum()
        denom = N * BH
        wiring = wiring / denom
        entropy = entropy / denom
        ctx.save_for_backward(q, k, v, bias, wiring_weight, index, mask, probs)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy, probs)
        return _columns_first(out, B, H, torch.promote_types(q.dtype, v.dtype)), wiring, entropy, probs

    @staticmethod
    def backward(ctx, g_out, g_wiring, _g_entropy, _g_probs):
        q, k, v, bias, wiring_weight, index, mask, probs = ctx.saved_tensors
        N, B, H, d = q.shape
        K = index.shape[1]
        dv = v.shape[-1]
        BH = B * H
        cdt = probs.dtype
        dev = q.device
        scale = d**-0.5
        need_q, need_k, need_v, need_bias, need_w = ctx.needs_input_grad[:5]
        gw = g_wiring.to(cdt) / (N * BH) if g_wiring is not None else None
        dq = torch.empty(BH, N, d, dtype=cdt, device=dev) if need_q else None
        dbias = torch.empty(N, K, dtype=cdt, device=dev) if need_bias else None
        dw = (gw * probs.sum(0)) if (need_w and gw is not None) else None
        with torch.autocast(dev.type, enabled=False):
            qt, kt, vt = (_heads_first(x, cdt) for x in (q, k, v))
            got = _heads_first(g_out, cdt) if g_out is not None else torch.zeros(BH, N, dv, dtype=cdt, device=dev)
            # pass 1, over reading columns: dS = P * (dP - sum P dP), dq, dbias
            ds_all = torch.empty(BH, N * K + 1, dtype=cdt, device=dev)  # + a zero slot for padding
            ds_all[:, -1] = 0
            ds_view = ds_all[:, :-1].view(BH, N, K)
            step = ctx.chunk or _chunk_size(N, K * BH * max(d, dv))
            for s in range(0, N, step):
                e = min(N, s + step)
                c = e - s
                flat = index[s:e].reshape(-1)
                p = probs[:, s:e]  # (BH, c, K)
                vg = vt.index_select(1, flat).view(BH, c, K, dv)
                dp = torch.matmul(vg, got[:, s:e, :, None]).squeeze(-1)  # (BH, c, K)
                del vg
                if gw is not None:
                    dp = dp + gw * wiring_weight[s:e].to(cdt)
                ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # 0 on masked edges
                del dp
                ds_view[:, s:e] = ds
                if dbias is not None:
                    dbias[s:e] = ds.sum(0)
                if dq is not None:
                    kg = kt.index_select(1, flat).view(BH, c, K, d)
                    dq[:, s:e] = torch.matmul(ds.unsqueeze(-2), kg).squeeze(-2) * scale
                    del kg
            # pass 2, over source columns: gather the edges leaving each column (no scatter-add)
            dk = dvv = None
            if need_k or need_v:
                rev, qry = reverse_edges(index, mask)
                R = rev.shape[1]
                dk = torch.empty(BH, N, d, dtype=cdt, device=dev) if need_k else None
                dvv = torch.empty(BH, N, dv, dtype=cdt, device=dev) if need_v else None
                if need_v:
                    p_all = torch.cat([probs.reshape(BH, N * K), probs.new_zeros(BH, 1)], dim=1)
                step = ctx.chunk or _chunk_size(N, R * BH * max(d, dv))
                for s in range(0, N, step):
                    e = min(N, s + step)
                    c = e - s
                    ids = rev[s:e].reshape(-1)
                    rows = qry[s:e].reshape(-1)
                    if dk is not None:
                        dsg = ds_all.index_select(1, ids).view(BH, c, 1, R)
                        qg = qt.index_select(1, rows).view(BH, c, R, d)
                        dk[:, s:e] = torch.matmul(dsg, qg).squeeze(-2) * scale
                        del qg
                    if dvv is not None:
                        pg = p_all.index_select(1, ids).view(BH, c, 1, R)
                        gg = got.index_select(1, rows).view(BH, c, R, dv)
                        dvv[:, s:e] = torch.matmul(pg, gg).squeeze(-2)
                        del gg
        return (
            _columns_first(dq, B, H, q.dtype) if dq is not None else None,
            _columns_first(dk, B, H, k.dtype) if dk is not None else None,
            _columns_first(dvv, B, H, v.dtype) if dvv is not None else None,
            dbias.to(bias.dtype) if dbias is not None else None,
            dw.to(wiring_weight.dtype) if dw is not None else None,
            None,
            None,
            None,
        )


def check_edges(N: int, bias, wiring_weight, edge_index, edge_mask) -> tuple[int, torch.Tensor | None]:
    """Check the (N, K) edge arrays of a per-edge kernel; returns K and the mask (None when nothing is masked)."""
    if edge_index.dim() != 2 or edge_index.shape[0] != N:
        raise ValueError(f"edge_index must be (N={N}, K), got {tuple(edge_index.shape)}")
    K = edge_index.shape[1]
    if wiring_weight.shape != (N, K):
        raise ValueError(f"wiring_weight must be (N, K) = {(N, K)}, got {tuple(wiring_weight.shape)}")
    if bias is not None and bias.shape != (N, K):
        raise ValueError(f"attention bias must be (N, K) = {(N, K)} for a sparse connectivity, got {tuple(bias.shape)}")
    if edge_mask is not None and edge_mask.all():
        edge_mask = None  # nothing to mask
    return K, edge_mask


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
    K, edge_mask = check_edges(N, bias, wiring_weight, edge_index, edge_mask)
    out, wiring, entropy, probs = _SparseAttention.apply(
        q, k, v, bias, wiring_weight, edge_index.long(), edge_mask, chunk
    )
    attn = probs.view(B, H, N, K) if record_attn else None  # float32 (or float64)
    return out, AttentionStats(wiring, entropy, attn)
