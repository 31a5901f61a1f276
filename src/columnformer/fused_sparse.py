"""Fused sparse attention for the CPU: the gather kernel's math in one C++ pass per column.

Same math as :func:`columnformer.sparse_attention.sparse_attention` (the specification)::

    score[q, e] = <Q_q, K_{index[q, e]}> / sqrt(d) + bias[q, e]      (-inf where mask[q, e] is False)
    A[q, :]     = softmax over the K edges of q
    out[q]      = sum_e A[q, e] V_{index[q, e]}
    wiring, entropy: means over (batch, head, q) of sum_e W A and -sum_e A log A

The torch gather kernel moves every column's K keys and values through ``index_select`` into
(chunk, K, B*H, d) tensors and runs a dozen elementwise passes over them; here
(``csrc/fused_sparse.cpp``) each column's K scores, its softmax, weighted values, wiring and entropy
are computed in registers and cache in one pass, and the keys and values are read where they lie.
Backward saves only the inputs and the (N, B*H) log-sum-exp (as flash attention does) and recomputes
the scores once, in one pass over reading columns that writes dq, the bias and wiring-weight gradients
and adds into the dk, dv rows of the sources: the visiting order is cut into blocks, and the blocks are
coloured so that blocks of one colour read disjoint sources (:func:`backward_phases`); colours run one
after another, the blocks of a colour in parallel. Where that needs too many colours (many long-range
edges) it takes two passes instead: the reading columns (dq, bias, wiring weight), then the source
columns through the inverted edge table (dk, dv, recomputing the scores). Either way every output row is
written by one thread in a fixed order: no atomics, and the result does not depend on the thread count
(the one-pass sums follow the visiting order, so another order changes them by rounding). Where neighbouring
columns read mostly the same sources (local connectivity), forward and the one-pass backward take **reader
groups**: 4 consecutive columns of the visiting order (a 2 x 2 square on a grid) against the union of their
sources (:func:`reader_groups`), so every key and value row is loaded, and every dk, dv row read and written,
once per group instead of once per edge. Columns are visited in
the tile order of :func:`columnformer.block_sparse.tile_order`, so the rows a thread reads stay in
cache. Scores, softmax and reductions run in float32 (float64 for float64 inputs).

The C++ source is part of the library's C++ kernels (:mod:`columnformer.native`), built on first use;
:func:`available` says whether they loaded, :func:`load_error` why not. CPU only: on CUDA use
``sparse_kernel='flex'`` or ``block``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import native
from .attention_stats import AttentionStats
from .block_sparse import tile_order
from .sparse_attention import check_edges, reverse_edges

ORDER_TILE = 16  # columns per tile of the visiting order (a 4 x 4 square on a grid)
# One-pass backward: blocks of the visiting order, coloured so that blocks of one colour share no source.
# A block size that depends on N only (so the result does not depend on the thread count): about
# BLOCKS_PER_SHEET blocks, at least MIN_BLOCK columns (a block much smaller than a neighbourhood conflicts
# with many others). The one pass is taken when every colour holds MIN_BLOCKS_PER_COLOUR blocks on average
# (enough to share among threads); else (e.g. many long-range edges) the two-pass backward.
BLOCKS_PER_SHEET = 128
MIN_BLOCK = 64
MIN_BLOCKS_PER_COLOUR = 4
BACKWARD = "auto"  # "auto" | "one_pass" | "two_pass" (tests and benchmarks force one)
# Reader groups (forward and the one-pass backward): READERS_PER_GROUP consecutive columns of the visiting order
# against the union of their sources, taken when the union holds at most GROUP_UNION_FRACTION of the groups' edges
# (each source row is then loaded at most that often per edge); else one column at a time.
READERS_PER_GROUP = 4  # RG in csrc/fused_sparse.cpp
GROUP_UNION_FRACTION = 0.6
GROUPS = "auto"  # "auto" | "on" | "off" (tests and benchmarks force one)
_COLOUR_CACHE: list = []
_GROUP_CACHE: list = []
_CACHE_SIZE = 8
available = native.available
load_error = native.load_error


def _require():
    ext = native.load()
    if ext is None:
        raise RuntimeError(
            f"sparse_kernel='fused' needs its C++ kernel, which could not be built ({native.load_error()}); it needs a "
            "C++ compiler (g++) and the 'ninja' package; use sparse_kernel='block' or 'gather' (the same math in PyTorch)"
        )
    return ext


def visit_order(coords) -> torch.Tensor:
    """(N,) long: the columns in tiles of ``ORDER_TILE`` nearby columns (``block_sparse.tile_order``)."""
    return torch.from_numpy(np.concatenate(tile_order(np.asarray(coords, dtype=np.float64), ORDER_TILE))).long()


@dataclass(eq=False)
class FusedPlan:
    """How the fused kernel visits a sheet's columns: ``order`` (N,) long, nearby columns together.
    Any order gives the same result; this one keeps the rows a thread reads in cache."""

    order: torch.Tensor
    versions: tuple = ()

    def to(self, device: torch.device) -> "FusedPlan":
        return FusedPlan(self.order.to(device), self.versions)

    def describe(self) -> dict:
        return {"kernel": "fused", "order_tile": ORDER_TILE}


def build_fused_plan(coords, index: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> FusedPlan:
    """A :class:`FusedPlan` from the columns' coordinates (``index``/``mask`` accepted for the builders' common
    signature; the edges are read at run time)."""
    return FusedPlan(visit_order(coords))


def _cached(cache: list, index: torch.Tensor, mask: torch.Tensor | None, order: torch.Tensor, build):
    """``build()`` once per (index, mask, order) tensor object and version (as
    :func:`columnformer.sparse_attention.reverse_edges`): a sheet's edge buffers are analysed once, and again only
    after ``rewire_sheet`` writes into them."""
    versions = (index._version, None if mask is None else mask._version, order._version)
    for entry in cache:
        if entry[0] is index and entry[1] is mask and entry[2] is order and entry[3] == versions:
            return entry[4]
    value = build()
    cache.append((index, mask, order, versions, value))
    del cache[:-_CACHE_SIZE]
    return value


def _valid(mask: torch.Tensor | None) -> torch.Tensor:
    return mask.contiguous() if mask is not None else torch.empty(0, dtype=torch.bool)


def backward_phases(index: torch.Tensor, mask: torch.Tensor | None, order: torch.Tensor):
    """The one-pass backward's schedule for these edges and this visiting order: ``(blocks, phase_ptr, block)``
    (the block ids sorted by colour, the offsets of each colour in them, the block size), or None when it
    needs more than 64 colours. Cached (:func:`_cached`)."""

    def build():
        N = index.shape[0]
        block = max(MIN_BLOCK, 1 << max(0, (N // BLOCKS_PER_SHEET - 1).bit_length()))
        colours = _require().sparse_block_colours(index, _valid(mask), order, block)
        if not colours.numel():
            return None
        blocks = torch.argsort(colours, stable=True)  # (nblocks,) by colour, visiting order within one
        phase_ptr = torch.cat([colours.new_zeros(1), torch.cumsum(torch.bincount(colours), 0)])
        return blocks, phase_ptr, block

    return _cached(_COLOUR_CACHE, index, mask, order, build)


def reader_groups(index: torch.Tensor, mask: torch.Tensor | None, order: torch.Tensor):
    """``(uni, ucount, slot)``: the sources' union of every group of ``READERS_PER_GROUP`` consecutive columns of
    ``order`` ((G, U) int32 padded, (G,) int32 sizes) and each edge's position in it ((N, K) int32), and the
    fraction of edges the unions hold. Cached (:func:`_cached`)."""

    def build():
        uni, ucount, slot = _require().sparse_reader_groups(index, _valid(mask), order)
        edges = index.numel() if mask is None else int(mask.sum())
        return uni, ucount, slot, int(ucount.sum()) / max(edges, 1)

    return _cached(_GROUP_CACHE, index, mask, order, build)


def _groups_for(index, mask, order):
    """The reader groups when the grouped kernels are taken (``GROUPS`` and the union's size), else None."""
    if GROUPS == "off":
        return None
    uni, ucount, slot, fraction = reader_groups(index, mask, order)
    if GROUPS == "auto" and fraction > GROUP_UNION_FRACTION:
        return None
    return uni, ucount, slot


def _one_pass_schedule(index, mask, order):
    """The schedule when the one-pass backward is taken (``BACKWARD`` and the blocks per colour), else None."""
    if BACKWARD == "two_pass":
        return None
    schedule = backward_phases(index, mask, order)
    if schedule is None:
        if BACKWARD == "one_pass":
            raise RuntimeError("fused_sparse.BACKWARD='one_pass', but these edges need more than 64 colours")
        return None
    blocks, phase_ptr, _ = schedule
    if BACKWARD == "auto" and len(blocks) < MIN_BLOCKS_PER_COLOUR * (len(phase_ptr) - 1):
        return None
    return schedule


def _padded_lanes(lanes: int, dtype: torch.dtype) -> int:
    """Lanes padded to a power-of-two number of 256-bit vectors (the C++ kernel's tiles need it)."""
    width = 256 // torch.finfo(dtype).bits  # lanes per 256-bit vector (LW in the C++ source)
    vectors = -(-lanes // width)
    return width * (1 << (vectors - 1).bit_length())


def _lanes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, B, H, d) -> contiguous (N, d, P) in ``dtype``: the kernel's layout, the B*H lanes innermost,
    zero-padded to P (a power-of-two number of 256-bit vectors). One pass: every column's (B*H, d) block
    transposed in C++ (strided inputs such as a slice of the query/key projection are read in place)."""
    N, B, H, d = x.shape
    P = _padded_lanes(B * H, dtype)
    x = x.to(dtype)
    rows = x.squeeze(2) if H == 1 else x.reshape(N, B * H, d)  # (N, B*H, d): a view where the strides allow
    if rows.stride(2) != 1:
        rows = rows.contiguous()
    return _require().to_lanes(rows, P)


def _unlanes(x: torch.Tensor, B: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, d, P) -> contiguous (N, B, H, d) in ``dtype`` (padding lanes dropped)."""
    N, d, _ = x.shape
    return _require().from_lanes(x, B * H).view(N, B, H, d).to(dtype)


class _FusedSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, wiring_weight, index, mask, order, record):
        ctx.set_materialize_grads(False)
        ext = _require()
        N, B, H, d = q.shape
        cdt = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
        with torch.autocast("cpu", enabled=False):
            qc, kc, vc = _lanes(q, cdt), _lanes(k, cdt), _lanes(v, cdt)
            b = bias.to(cdt).contiguous() if bias is not None else qc.new_empty(0)
            w = wiring_weight.to(cdt).contiguous()
            valid = _valid(mask)
            groups = _groups_for(index, None if valid.numel() == 0 else valid, order)
            none = torch.empty(0, dtype=torch.int32)
            uni, ucount, slot = groups if groups is not None else (none, none, none)
            out, lse, colw, colh, probs = ext.sparse_forward(qc, kc, vc, index, valid, b, w, order, d**-0.5, B * H, record,
                                                             uni, ucount, slot)
            denom = N * B * H
            wiring, entropy = colw.sum() / denom, colh.sum() / denom
        ctx.save_for_backward(qc, kc, vc, b, w, index, valid, order, lse)
        ctx.meta = (B, H, q.dtype, k.dtype, v.dtype, None if bias is None else bias.dtype, wiring_weight.dtype)
        ctx.mark_non_differentiable(entropy, probs)
        return _unlanes(out, B, H, torch.promote_types(q.dtype, v.dtype)), wiring, entropy, probs

    @staticmethod
    def backward(ctx, g_out, g_wiring, _g_entropy, _g_probs):
        qc, kc, vc, b, w, index, valid, order, lse = ctx.saved_tensors
        B, H, qdt, kdt, vdt, bdt, wdt = ctx.meta
        N, d, _ = qc.shape
        BH = B * H
        need_q, need_k, need_v, need_bias, need_w = ctx.needs_input_grad[:5]
        gw = float(g_wiring) / (N * BH) if g_wiring is not None else 0.0
        need_w = need_w and g_wiring is not None
        g = _lanes(g_out, qc.dtype) if g_out is not None else torch.zeros_like(vc)
        mask = None if valid.numel() == 0 else valid
        schedule = _one_pass_schedule(index, mask, order) if need_k or need_v else None
        rev = qry = index.new_empty(0, 0)
        blocks = phase_ptr = index.new_empty(0)
        block = 1
        uni = ucount = slot = torch.empty(0, dtype=torch.int32)
        if schedule is not None:
            blocks, phase_ptr, block = schedule
            groups = _groups_for(index, mask, order) if block % READERS_PER_GROUP == 0 else None
            if groups is not None:
                uni, ucount, slot = groups
        elif need_k or need_v:
            rev, qry = reverse_edges(index, mask)
        with torch.autocast("cpu", enabled=False):
            dq, dk, dvv, dbias, dw = _require().sparse_backward(
                qc, kc, vc, index, valid, b, w, order, d**-0.5, BH, lse, g, gw, rev, qry, blocks, phase_ptr, block,
                uni, ucount, slot, need_q, need_k, need_v, need_bias, need_w,
            )
        del g  # the output gradient's lanes copy, before the conversions below allocate
        # back to (N, B, H, d) one gradient at a time, each lanes copy dropped as soon as it is converted
        gq = _unlanes(dq, B, H, qdt) if need_q else None
        del dq
        gk = _unlanes(dk, B, H, kdt) if need_k else None
        del dk
        gv = _unlanes(dvv, B, H, vdt) if need_v else None
        del dvv
        return (
            gq, gk, gv,
            dbias.to(bdt) if need_bias else None,
            dw.to(wdt) if need_w else None,
            None, None, None, None,
        )


def fused_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    edge_index: torch.Tensor,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention over the K incoming edges of every column; arguments and returns as
    :func:`columnformer.sparse_attention.sparse_attention`. ``order``: (N,) long, the order in which
    columns are visited (:func:`visit_order` of the geometry; None: 0..N-1) — it changes speed only."""
    N, B, H, d = q.shape
    if q.device.type != "cpu":
        raise ValueError(f"sparse_kernel='fused' runs on CPU; the inputs are on {q.device.type}: use 'flex' or 'block' there")
    K, edge_mask = check_edges(N, bias, wiring_weight, edge_index, edge_mask)
    if order is None:
        order = torch.empty(0, dtype=torch.long)
    out, wiring, entropy, probs = _FusedSparseAttention.apply(
        q, k, v, bias, wiring_weight, edge_index.long().contiguous(), edge_mask, order, record_attn
    )
    attn = probs.view(N, B, H, K).permute(1, 2, 0, 3) if record_attn else None  # (B, H, N, K)
    return out, AttentionStats(wiring, entropy.detach(), attn)
