"""Block-sparse attention kernel: local connectivity as dense attention between tiles of columns.

Same math as :func:`columnformer.attention.dense_attention` and the gather kernel
(:mod:`columnformer.sparse_attention`), restricted to the same (N, K) edges::

    score[q, e] = <Q_q, K_{index[q, e]}> / sqrt(d) + bias[q, e]      (-inf where mask[q, e] is False)
    A[q, :]     = softmax over the K edges of q
    out[q]      = sum_e A[q, e] V_{index[q, e]}

Local connectivity on a grid, a stack or a sphere is a stencil: neighbouring columns read nearly
the same keys. A :class:`BlockPlan` (built once per edge set, from the columns' coordinates):

* **tiles** the columns: recursive bisection of the coordinates along their widest extent, so each
  tile holds ``P`` nearby columns (an 8 x 8 square of a power-of-two grid at P = 64);
* gives every tile a **key set**: the sources read by at least ``min_readers`` of its columns,
  padded to ``U`` slots. A tile's scores against its key set are one dense (P, d) x (d, U) matmul,
  its weighted values one (P, U) x (U, dv) matmul, batched over (batch x heads, tiles); an additive
  (P, U) mask puts each edge's bias on its slot and -inf everywhere else, so the result is exact;
* leaves the other edges (long-range edges, sources few columns of the tile read) to a **gather**
  part: per column up to ``G`` gathered keys, concatenated with the block scores before the softmax.

Nothing of size O(N K C) or O(N U) is saved for backward: the kernel saves q, k, v (the caller's
tensors), the (N,) log-sum-exp per (batch, head) row, and recomputes each tile's scores in
backward (as flash attention does). Key and value gradients are accumulated with ``index_add_`` over
the key sets; the bias gradient is read back from the score gradients at each edge's slot.

The plan's cost model (:func:`plan_costs`) estimates both kernels' work in units of one dense score
element; ``sparse_kernel="auto"`` on the sheet takes the block kernel when it is estimated cheaper.
Scores, softmax and reductions run in float32 (float64 for float64 inputs), as in the gather kernel.

GPU note: this is plain PyTorch (index_select, bmm, softmax), so it runs on CUDA unchanged; a
FlexAttention block mask could be derived from the same tiles, but no GPU was available to build
and measure one, so none is claimed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

# Elements of one (batch*heads, tiles, P, U) score block: small enough (2 MiB fp32) that the matmuls and
# the softmax of a chunk run in cache (2-3x faster tile matmuls than 16 MiB blocks on a 2-core AVX2 CPU).
CHUNK_ELEMENTS = 1 << 19
TILE_SIZES = (16, 32, 64)
MIN_READERS = (1, 2, 3, 4)
# Cost model, in units of one dense score element of the block kernel (forward + backward: the two
# score/value matmuls, bias add, softmax, recompute, four gradient matmuls). A gathered edge of either
# kernel moves d + dv floats twice per pass through an index_select / index_add_ and runs matrix-vector
# products; measured on a 2-core AVX2 CPU (benchmarks/scale.py) it costs ~6 dense score elements.
GATHER_EDGE_COST = 6.0
TILE_OVERHEAD = 40.0  # fixed cost per (batch*head, tile): kernel launches amortised over a chunk


@dataclass(eq=False)
class BlockPlan:
    """How the block kernel visits an (N, K) edge set. Rows are columns in tile order.

    Attributes:
        tile: P, columns per tile; ``T`` tiles, ``R = T * P`` rows (padding rows read a dummy column).
        perm: (R,) long, the column of each row (N for padding rows: a zero row appended inside).
        row_of: (N,) long, the row of each column.
        keys: (T, U) long, each tile's key set (source columns; N pads).
        e_slot, e_col: (E,) long, the edges served by the block part, rows ascending: ``row * U + u``
            (u the source's key slot) and ``column * K + e`` (the edge in (N, K) edge arrays).
        tile_edges: T + 1 offsets of each tile's edges in ``e_slot`` (a list).
        g_src, g_col: (R, G) long, each row's gathered edges: source column (N pads) and ``column * K + e``.
        g_valid: (R, G) bool.
        pad_slot: ``row * U`` of the padding rows, ascending (a list; they get one zero score).
        min_readers: sources read by fewer columns of a tile are gathered.
        versions: the (index, mask) tensor versions the plan was built from (``rewire_sheet`` bumps them).
    """

    n: int
    k: int
    tile: int
    perm: torch.Tensor
    row_of: torch.Tensor
    keys: torch.Tensor
    e_slot: torch.Tensor
    e_col: torch.Tensor
    tile_edges: list
    g_src: torch.Tensor
    g_col: torch.Tensor
    g_valid: torch.Tensor
    pad_slot: list
    min_readers: int
    cost: float
    gather_cost: float
    versions: tuple = ()

    @property
    def num_tiles(self) -> int:
        return self.keys.shape[0]

    @property
    def key_slots(self) -> int:
        return self.keys.shape[1]

    @property
    def gathered(self) -> int:
        return self.g_src.shape[1]

    def to(self, device: torch.device) -> "BlockPlan":
        moved = {f: getattr(self, f).to(device) for f in ("perm", "row_of", "keys", "e_slot", "e_col", "g_src", "g_col", "g_valid")}
        return BlockPlan(**{**self.__dict__, **moved})

    def describe(self) -> dict:
        """Sizes and cost estimates, for logs and benchmarks."""
        return {
            "tile": self.tile, "tiles": self.num_tiles, "key_slots": self.key_slots, "gathered_per_column": self.gathered,
            "min_readers": self.min_readers, "est_cost": self.cost, "est_gather_kernel_cost": self.gather_cost,
            "est_speedup": self.gather_cost / max(self.cost, 1e-9),
        }


# ---------------------------------------------------------------------- tiling
def tile_order(coords: np.ndarray, tile: int) -> list[np.ndarray]:
    """Split columns into tiles of at most ``tile`` nearby columns by recursive bisection.

    Each group is sorted along its widest coordinate extent and split so that the first part holds
    ``tile * ceil(tiles / 2)`` columns (full tiles wherever possible). Vectorised over groups: one
    ``lexsort`` per level, O(N log N log(N / tile)). Returns the tiles in order (arrays of columns).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    order = np.arange(n)
    group = np.zeros(n, dtype=np.int64)  # group id of order[i], groups contiguous in order
    while True:
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        sizes = np.diff(np.r_[starts, n])
        if sizes.max() <= tile:
            break
        c = coords[order]
        extent = np.maximum.reduceat(c, starts, axis=0) - np.minimum.reduceat(c, starts, axis=0)
        dim = np.argmax(extent, axis=1)  # widest dimension of each group
        gidx = np.repeat(np.arange(len(starts)), sizes)
        key = c[np.arange(n), dim[gidx]]
        # stable: ties keep the current order (deterministic)
        o = np.lexsort((np.arange(n), key, gidx))
        order = order[o]
        ntiles = -(-sizes // tile)
        left = np.minimum(tile * (-(-ntiles // 2)), sizes)
        rank = np.arange(n) - np.repeat(starts, sizes)
        split = np.repeat(sizes > tile, sizes) & (rank >= np.repeat(left, sizes))
        group = 2 * gidx + split
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.split(order, starts[1:])


def build_block_plan(
    coords: np.ndarray,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    tile: int | None = None,
    min_readers: int | None = None,
    heads_dims: tuple[int, int] = (16, 32),
) -> BlockPlan:
    """The cheapest block plan (by :func:`plan_costs`) over ``TILE_SIZES`` x ``MIN_READERS``.

    ``tile`` / ``min_readers`` fix one choice instead. ``heads_dims`` = (d, dv) weights the gathered
    edges against the dense score elements (the cost model is per element, not calibrated per shape).
    """
    idx = index.detach().cpu().numpy()
    msk = np.ones(idx.shape, bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
    best = None
    for P in (TILE_SIZES if tile is None else (tile,)):
        tiles = tile_order(coords, P)
        for r in (MIN_READERS if min_readers is None else (min_readers,)):
            plan = _plan_for_tiles(tiles, idx, msk, P, r)
            if best is None or plan.cost < best.cost:
                best = plan
    return best


def _plan_for_tiles(tiles: list[np.ndarray], idx: np.ndarray, msk: np.ndarray, P: int, min_readers: int) -> BlockPlan:
    n, K = idx.shape
    T = len(tiles)
    R = T * P
    perm = np.full(R, n, dtype=np.int64)
    for t, cols in enumerate(tiles):
        perm[t * P : t * P + len(cols)] = cols
    real = perm < n
    row_of = np.empty(n, dtype=np.int64)
    row_of[perm[real]] = np.flatnonzero(real)
    rows = np.flatnonzero(real)  # rows holding a column
    src = idx[perm[rows]]  # (Nr, K)
    valid = msk[perm[rows]]
    tile_of = rows // P
    # distinct (tile, source) pairs and how many of the tile's columns read each source
    pair = tile_of[:, None] * (n + 1) + src
    flat_pair = pair[valid]
    uniq, inv, counts = np.unique(flat_pair, return_inverse=True, return_counts=True)
    in_block = counts >= min_readers
    u_tile = uniq // (n + 1)
    # slot of each kept pair within its tile
    kept = np.flatnonzero(in_block)
    kt = u_tile[kept]
    starts = np.searchsorted(kt, np.arange(T))
    rank = np.arange(len(kept)) - starts[kt]
    U = max(1, int(np.bincount(kt, minlength=T).max()) if len(kept) else 1)
    keys = np.full((T, U), n, dtype=np.int64)
    keys[kt, rank] = uniq[kept] % (n + 1)
    pair_slot = np.full(len(uniq), -1, dtype=np.int64)
    pair_slot[kept] = rank
    edge_u = np.full(src.shape, -1, dtype=np.int64)
    edge_u[valid] = pair_slot[inv]
    in_blk = edge_u >= 0  # (Nr, K), row-major order = rows ascending
    r_b, e_b = np.nonzero(in_blk)
    e_slot = rows[r_b] * U + edge_u[r_b, e_b]
    e_col = perm[rows[r_b]] * K + e_b
    tile_edges = np.searchsorted(rows[r_b], np.arange(T + 1) * P).tolist()
    gathered = valid & ~in_blk
    G = int(gathered.sum(1).max()) if gathered.size else 0
    g_src = np.full((R, G), n, dtype=np.int64)
    g_col = np.zeros((R, G), dtype=np.int64)
    g_valid = np.zeros((R, G), dtype=bool)
    if G:
        r_i, e_i = np.nonzero(gathered)  # row-major: edge order within each column
        cstart = np.searchsorted(r_i, np.arange(len(rows)))
        j = np.arange(len(r_i)) - cstart[r_i]
        g_src[rows[r_i], j] = src[r_i, e_i]
        g_col[rows[r_i], j] = perm[rows[r_i]] * K + e_i
        g_valid[rows[r_i], j] = True
    pad_rows = np.flatnonzero(~real)
    cost, gather_cost = plan_costs(T, P, U, int(gathered.sum()), int(valid.sum()), G * R)
    t = torch.from_numpy
    return BlockPlan(
        n=n, k=K, tile=P, perm=t(perm), row_of=t(row_of), keys=t(keys), e_slot=t(e_slot), e_col=t(e_col),
        tile_edges=tile_edges, g_src=t(g_src), g_col=t(g_col), g_valid=t(g_valid), pad_slot=(pad_rows * U).tolist(),
        min_readers=min_readers, cost=cost, gather_cost=gather_cost,
    )


def plan_costs(tiles: int, tile: int, key_slots: int, gathered: int, edges: int, gathered_padded: int) -> tuple[float, float]:
    """Estimated work per (batch x head), in dense-score-element units: (block plan, gather kernel).

    Block: T * P * U score elements + ``GATHER_EDGE_COST`` per gathered slot (padding included, it is
    computed) + a fixed overhead per tile. Gather kernel: ``GATHER_EDGE_COST`` per edge.
    """
    block = tiles * tile * key_slots + GATHER_EDGE_COST * gathered_padded + TILE_OVERHEAD * tiles
    return float(block), float(GATHER_EDGE_COST * edges)


# ---------------------------------------------------------------------- kernel
def _heads_first_padded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, B, H, d) -> contiguous (B*H, N + 1, d) in ``dtype``; row N is zeros (padding reads it)."""
    N, B, H, d = x.shape
    out = torch.empty(B, H, N + 1, d, dtype=dtype, device=x.device)
    out[:, :, :N].copy_(x.permute(1, 2, 0, 3))
    out[:, :, N].zero_()
    return out.view(B * H, N + 1, d)


class _Tiles:
    """Per-call edge values in the plan's order: bias and wiring weight of block and gathered edges."""

    def __init__(self, plan: BlockPlan, bias, wiring_weight, cdt):
        self.plan = plan
        w = wiring_weight.reshape(-1).to(cdt)
        self.w_block = w.index_select(0, plan.e_col)
        self.b_block = bias.reshape(-1).to(cdt).index_select(0, plan.e_col) if bias is not None else None
        if plan.gathered:
            gv = plan.g_valid
            b = bias.reshape(-1).to(cdt)[plan.g_col] if bias is not None else torch.zeros(gv.shape, dtype=cdt, device=gv.device)
            self.g_bias = b.masked_fill_(~gv, float("-inf"))  # (R, G)
            self.g_w = w[plan.g_col].masked_fill_(~gv, 0.0)  # (R, G)

    def chunk_mask(self, t0: int, t1: int, cdt) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(c, P, U) additive mask of tiles [t0, t1); the flat slots of their block edges in the scores'
        (c * P, U + G) layout; and the range [e0, e1) of those edges in the plan's edge list."""
        plan = self.plan
        P, U, G = plan.tile, plan.key_slots, plan.gathered
        r0, r1 = t0 * P, t1 * P
        e0, e1 = plan.tile_edges[t0], plan.tile_edges[t1]
        m = torch.full(((t1 - t0) * P * U,), float("-inf"), dtype=cdt, device=plan.perm.device)
        local = plan.e_slot[e0:e1] - r0 * U
        if self.b_block is not None:
            m[local] = self.b_block[e0:e1]
        else:
            m[local] = 0.0
        lo, hi = bisect.bisect_left(plan.pad_slot, r0 * U), bisect.bisect_left(plan.pad_slot, r1 * U)
        if hi > lo:  # padding rows: one zero score on slot 0 keeps their softmax finite (outputs dropped)
            m[torch.tensor(plan.pad_slot[lo:hi], device=m.device) - r0 * U] = 0.0
        if G:  # the same slots in the (c*P, U + G) layout of the concatenated scores
            local = torch.div(local, U, rounding_mode="floor") * (U + G) + local % U
        return m.view(t1 - t0, P, U), local, e0, e1


def _scores(qr, kt, plan: BlockPlan, tiles: _Tiles, t0, t1, scale, BH, cdt):
    """Scores of tiles [t0, t1): block (BH*c, P, U) concatenated with gathered (BH*c, P, G)."""
    P, U, G = plan.tile, plan.key_slots, plan.gathered
    c = t1 - t0
    r0, r1 = t0 * P, t1 * P
    d = qr.shape[-1]
    qc = qr[:, r0:r1].reshape(BH * c, P, d)
    ku = kt.index_select(1, plan.keys[t0:t1].reshape(-1)).view(BH * c, U, d)
    s = torch.bmm(qc, ku.transpose(1, 2)).mul_(scale)  # (BH*c, P, U)
    m, local, e0, e1 = tiles.chunk_mask(t0, t1, cdt)
    s.view(BH, c, P, U).add_(m)
    kg = None
    if G:
        kg = kt.index_select(1, plan.g_src[r0:r1].reshape(-1)).view(BH, c * P, G, d)
        sg = torch.matmul(kg, qr[:, r0:r1, :, None]).squeeze(-1).mul_(scale)  # (BH, c*P, G)
        sg.add_(tiles.g_bias[r0:r1])
        s = torch.cat([s.view(BH, c * P, U), sg], dim=-1).view(BH * c, P, U + G)
    return s, qc, ku, kg, local, e0, e1


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """sum p log p (0 log 0 = 0); a log and a dot product (xlogy is ~4x slower on CPU)."""
    p = p.reshape(-1)
    return torch.dot(p, p.clamp_min(torch.finfo(p.dtype).tiny).log_())


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, wiring_weight, plan: BlockPlan, chunk, record):
        ctx.set_materialize_grads(False)
        N, B, H, d = q.shape
        dv = v.shape[-1]
        BH = B * H
        cdt = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
        scale = d**-0.5
        P, U, G, T = plan.tile, plan.key_slots, plan.gathered, plan.num_tiles
        R = T * P
        step = chunk or max(1, CHUNK_ELEMENTS // (BH * P * (U + G)))
        with torch.autocast(q.device.type, enabled=False):
            qt, kt, vt = (_heads_first_padded(x, cdt) for x in (q, k, v))
            qr = qt.index_select(1, plan.perm)  # (BH, R, d), padding rows zero
            del qt
            tiles = _Tiles(plan, bias, wiring_weight, cdt)
            out_r = torch.empty(BH, R, dv, dtype=cdt, device=q.device)
            edge_probs = torch.empty(BH, plan.e_slot.shape[0] if record else 0, dtype=cdt, device=q.device)
            g_probs = torch.empty(BH, R, G, dtype=cdt, device=q.device) if (G and record) else None
            wiring = torch.zeros((), dtype=cdt, device=q.device)
            entropy = torch.zeros((), dtype=cdt, device=q.device)
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                c = t1 - t0
                r0, r1 = t0 * P, t1 * P
                s, _, _, _, local, e0, e1 = _scores(qr, kt, plan, tiles, t0, t1, scale, BH, cdt)
                p = torch.softmax(s, dim=-1)  # (BH*c, P, U+G)
                del s
                pb = p[..., :U]
                vu = vt.index_select(1, plan.keys[t0:t1].reshape(-1)).view(BH * c, U, dv)
                o = torch.bmm(pb, vu).view(BH, c * P, dv)
                ep = p.view(BH, -1).index_select(1, local)  # (BH, edges of the chunk)
                if record:
                    edge_probs[:, e0:e1] = ep
                wiring += torch.dot(ep.sum(0), tiles.w_block[e0:e1])
                entropy -= _plogp(ep)
                if G:
                    pg = p.view(BH, c * P, U + G)[..., U:]
                    if record:
                        g_probs[:, r0:r1] = pg
                    vg = vt.index_select(1, plan.g_src[r0:r1].reshape(-1)).view(BH, c * P, G, dv)
                    o = o + torch.matmul(pg.unsqueeze(-2), vg).squeeze(-2)
                    wiring += (pg * tiles.g_w[r0:r1]).sum()
                    entropy -= _plogp(pg)
                out_r[:, r0:r1] = o
            denom = N * BH
            wiring, entropy = wiring / denom, entropy / denom
            out = out_r.index_select(1, plan.row_of)  # (BH, N, dv) in column order
        ctx.save_for_backward(q, k, v, bias, wiring_weight)
        ctx.cdt = cdt
        ctx.plan, ctx.chunk = plan, chunk
        ctx.mark_non_differentiable(entropy, edge_probs)
        out = out.view(B, H, N, dv).permute(2, 0, 1, 3).contiguous().to(torch.promote_types(q.dtype, v.dtype))
        return out, wiring, entropy, edge_probs, (g_probs if g_probs is not None else edge_probs.new_zeros(0))

    @staticmethod
    def backward(ctx, g_out, g_wiring, _g_entropy, _g_edge_probs, _g_gprobs):
        q, k, v, bias, wiring_weight = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        N, B, H, d = q.shape
        dv = v.shape[-1]
        BH = B * H
        cdt = ctx.cdt
        dev = q.device
        scale = d**-0.5
        P, U, G, T = plan.tile, plan.key_slots, plan.gathered, plan.num_tiles
        R = T * P
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        gw = g_wiring.to(cdt) / (N * BH) if g_wiring is not None else None
        step = ctx.chunk or max(1, CHUNK_ELEMENTS // (BH * P * (U + G)))
        with torch.autocast(dev.type, enabled=False):
            qt, kt, vt = (_heads_first_padded(x, cdt) for x in (q, k, v))
            qr = qt.index_select(1, plan.perm)
            del qt
            if g_out is not None:
                go = _heads_first_padded(g_out, cdt).index_select(1, plan.perm)  # (BH, R, dv), padding rows zero
            else:
                go = torch.zeros(BH, R, dv, dtype=cdt, device=dev)
            tiles = _Tiles(plan, bias, wiring_weight, cdt)
            dq_r = torch.empty(BH, R, d, dtype=cdt, device=dev) if need_q else None
            dk = torch.zeros(BH, N + 1, d, dtype=cdt, device=dev) if need_k else None
            dvv = torch.zeros(BH, N + 1, dv, dtype=cdt, device=dev) if need_v else None
            d_edge = torch.empty(plan.e_slot.shape[0], dtype=cdt, device=dev) if need_bias else None
            dg_bias = torch.zeros(R, G, dtype=cdt, device=dev) if (need_bias and G) else None
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                c = t1 - t0
                r0, r1 = t0 * P, t1 * P
                s, qc, ku, kg, local, e0, e1 = _scores(qr, kt, plan, tiles, t0, t1, scale, BH, cdt)
                p = torch.softmax(s, dim=-1)  # recomputed, bit-identical to forward: (BH*c, P, U+G)
                del s
                keys = plan.keys[t0:t1].reshape(-1)
                vu = vt.index_select(1, keys).view(BH * c, U, dv)
                goc = go[:, r0:r1].reshape(BH * c, P, dv)
                dpb = torch.bmm(goc, vu.transpose(1, 2))  # (BH*c, P, U)
                if G:
                    vg = vt.index_select(1, plan.g_src[r0:r1].reshape(-1)).view(BH, c * P, G, dv)
                    dpg = torch.matmul(vg, go[:, r0:r1, :, None]).squeeze(-1)  # (BH, c*P, G)
                    if gw is not None:
                        dpg.add_(gw * tiles.g_w[r0:r1])
                    dp = torch.cat([dpb.view(BH, c * P, U), dpg], dim=-1).view(BH * c, P, U + G)
                else:
                    dp = dpb
                del dpb
                if gw is not None:  # the wiring term: dA[q, e] += g * W[q, e] / (B H N)
                    dp.view(BH, -1).index_add_(1, local, (gw * tiles.w_block[e0:e1]).expand(BH, -1))
                ds = torch._softmax_backward_data(dp, p, -1, cdt)  # A * (dA - sum A dA)
                del dp
                dsb = ds[..., :U] if G else ds
                if d_edge is not None:
                    d_edge[e0:e1] = ds.view(BH, -1).index_select(1, local).sum(0)
                if dq_r is not None:
                    dqc = torch.bmm(dsb, ku)
                    if G:
                        dsg = ds.view(BH, c * P, U + G)[..., U:]
                        dqc = dqc.view(BH, c * P, d) + torch.matmul(dsg.unsqueeze(-2), kg).squeeze(-2)
                    dq_r[:, r0:r1] = dqc.view(BH, c * P, d).mul_(scale)
                if dk is not None:
                    dk.index_add_(1, keys, torch.bmm(dsb.transpose(1, 2), qc).mul_(scale).view(BH, c * U, d))
                if dvv is not None:
                    pb = p[..., :U] if G else p
                    dvv.index_add_(1, keys, torch.bmm(pb.transpose(1, 2), goc).view(BH, c * U, dv))
                if G:
                    dsg = ds.view(BH, c * P, U + G)[..., U:]
                    gsrc = plan.g_src[r0:r1].reshape(-1)
                    if dk is not None:
                        dkg = (dsg.unsqueeze(-1) * qr[:, r0:r1, None, :]).mul_(scale)  # (BH, c*P, G, d)
                        dk.index_add_(1, gsrc, dkg.view(BH, c * P * G, d))
                    if dvv is not None:
                        pg = p.view(BH, c * P, U + G)[..., U:]
                        dvg = pg.unsqueeze(-1) * go[:, r0:r1, None, :]  # (BH, c*P, G, dv)
                        dvv.index_add_(1, gsrc, dvg.reshape(BH, c * P * G, dv))
                    if dg_bias is not None:
                        dg_bias[r0:r1] = dsg.sum(0)
            dq = dk_out = dv_out = dbias = None
            if dq_r is not None:
                dq = dq_r.index_select(1, plan.row_of).view(B, H, N, d).permute(2, 0, 1, 3).to(q.dtype)
            if dk is not None:
                dk_out = dk[:, :N].view(B, H, N, d).permute(2, 0, 1, 3).to(k.dtype)
            if dvv is not None:
                dv_out = dvv[:, :N].view(B, H, N, dv).permute(2, 0, 1, 3).to(v.dtype)
            if need_bias:
                flat = torch.zeros(N * plan.k, dtype=cdt, device=dev)
                flat[plan.e_col] = d_edge
                if G:
                    flat[plan.g_col[plan.g_valid]] = dg_bias[plan.g_valid]
                dbias = flat.view(N, plan.k).to(bias.dtype)
        return dq, dk_out, dv_out, dbias, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    plan: BlockPlan,
    record_attn: bool = False,
    chunk: int | None = None,
):
    """Attention over a plan's edges. Shapes as :func:`columnformer.sparse_attention.sparse_attention`.

    Returns ``(out (N, B, H, dv), wiring, entropy, attn)``; ``attn`` (B, H, N, K) only if ``record_attn``.
    """
    N, B, H, d = q.shape
    if plan.n != N:
        raise ValueError(f"block plan is for {plan.n} columns, the inputs have {N}")
    if wiring_weight.shape != (N, plan.k):
        raise ValueError(f"wiring_weight must be (N, K) = {(N, plan.k)}, got {tuple(wiring_weight.shape)}")
    if bias is not None and bias.shape != (N, plan.k):
        raise ValueError(f"attention bias must be (N, K) = {(N, plan.k)}, got {tuple(bias.shape)}")
    out, wiring, entropy, edge_probs, g_probs = _BlockSparseAttention.apply(
        q, k, v, bias, wiring_weight, plan, chunk, record_attn
    )
    attn = None
    if record_attn:
        attn = _edge_map(plan, edge_probs, g_probs, B, H)
    return out, wiring, entropy.detach(), attn


def _edge_map(plan: BlockPlan, edge_probs, g_probs, B, H) -> torch.Tensor:
    """(B, H, N, K) attention per edge (0 on padding edges), in column order."""
    BH = B * H
    flat = torch.zeros(BH, plan.n * plan.k, dtype=edge_probs.dtype, device=edge_probs.device)
    flat[:, plan.e_col] = edge_probs.detach()
    if plan.gathered:
        flat[:, plan.g_col[plan.g_valid]] = g_probs.detach()[:, plan.g_valid]
    return flat.view(B, H, plan.n, plan.k)
