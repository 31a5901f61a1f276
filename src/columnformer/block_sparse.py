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

Nothing of size O(N K C) or O(N U) is saved for backward: the kernel saves only its inputs (q, k, v,
the bias and the wiring weight) and recomputes each tile's scores and softmax in backward (as flash
attention does; the recomputation is bit-identical to the forward). Inputs and gradient accumulators
stay in the caller's columns-first (N, B*H, d) layout, so every gather and ``index_add_`` moves whole rows;
each chunk of tiles is permuted to heads-major for its matmuls. The bias gradient is read back from the
score gradients at each edge's slot. Chunks hold ``CHUNK_ELEMENTS`` score elements (cache-sized).

The plan's cost model (:func:`plan_costs`) estimates both kernels' work in units of one dense score
element; ``sparse_kernel="auto"`` on the sheet takes the block kernel when it is estimated cheaper.
Scores, softmax and reductions run in float32 (float64 for float64 inputs), as in the gather kernel.

GPU note: this is plain PyTorch (index_select, bmm, softmax), so it runs on CUDA unchanged; the
FlexAttention backend (:mod:`columnformer.flex_sparse`, ``sparse_kernel='flex'``) derives a block
mask from the same tiles for CUDA (tested on CPU, speed unmeasured: no GPU was available).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

# Elements of one (batch*heads, tiles, P, U) score block: small enough (2 MiB fp32) that the matmuls and
# the softmax of a chunk run in cache (2-3x faster tile matmuls than 16 MiB blocks on a 2-core AVX2 CPU).
CHUNK_ELEMENTS = 1 << 19
TILE_SIZES = (16, 32, 64)
MIN_READERS = (1, 2, 3, 4)
# Cost model, in units of one dense score element of the block kernel (forward + backward: the score
# and value matmuls, mask, softmax, recompute, gradient matmuls). A gathered edge, in the block kernel's
# gathered part or in the gather kernel, moves its key and value rows through index_select / index_add_
# and runs elementwise products. Calibrated on a 2-core AVX2 CPU from training steps of the `wide` preset
# (B*H = 64, d = 8) with forced plans (tile 16, min_readers 1/2/3, and the gather kernel): a gathered edge
# costs 9-11 score elements; on the benchmark sheet of benchmarks/scale.py (B*H = 8, d = 16) about 8.
GATHER_EDGE_COST = 10.0
TILE_OVERHEAD = 40.0  # fixed cost per (batch*head, tile): kernel launches amortised over a chunk


@dataclass(eq=False)
class BlockPlan:
    """How the block kernel visits an (N, K) edge set. Rows are columns in tile order.

    Attributes:
        tile: P, columns per tile; ``T`` tiles, ``R = T * P`` rows (padding rows fill the last tiles of uneven groups).
        perm: (R,) long, the column of each row (column 0 for padding rows, see ``row_valid``).
        row_valid: (R,) float, 1 for rows holding a column, 0 for padding rows.
        row_of: (N,) long, the row of each column.
        keys: (T, U) long, each tile's key set (source columns; unused slots read column 0, masked).
        e_slot, e_col: (E,) long, the edges served by the block part, rows ascending: ``row * U + u``
            (u the source's key slot) and ``column * K + e`` (the edge in (N, K) edge arrays).
        tile_edges: T + 1 offsets of each tile's edges in ``e_slot`` (a list).
        g_src, g_col: (R, G) long, each row's gathered edges: source column and ``column * K + e`` (0 on
            padding, masked by ``g_valid``).
        g_valid: (R, G) bool.
        pad_slot: ``row * U`` of the padding rows, ascending (a list; they get one zero score).
        min_readers: sources read by fewer columns of a tile are gathered.
        versions: the (index, mask) tensor versions the plan was built from (``rewire_sheet`` bumps them).
    """

    n: int
    k: int
    tile: int
    perm: torch.Tensor
    row_valid: torch.Tensor
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
        tensors = ("perm", "row_valid", "row_of", "keys", "e_slot", "e_col", "g_src", "g_col", "g_valid")
        moved = {f: getattr(self, f).to(device) for f in tensors}
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
) -> BlockPlan:
    """The cheapest block plan (by :func:`plan_costs`) over ``TILE_SIZES`` x ``MIN_READERS``.

    ``coords`` (N, D) place the columns (tiles are built from them); ``index``/``mask`` (N, K) are the
    edges. ``tile`` / ``min_readers`` fix one choice instead of searching. The cost model counts elements,
    whatever the head dimensions (calibrated on two shapes, see ``GATHER_EDGE_COST``).
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
    keys = np.zeros((T, U), dtype=np.int64)
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
    g_src = np.zeros((R, G), dtype=np.int64)
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
        n=n, k=K, tile=P, perm=t(np.where(real, perm, 0)), row_valid=t(real.astype(np.float32)), row_of=t(row_of), keys=t(keys), e_slot=t(e_slot), e_col=t(e_col),
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


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, BH: int, cdt) -> torch.Tensor:
    """Rows ``idx`` of an (N, B, H, d) tensor as (len(idx), B*H, d) in ``cdt``: one contiguous row per column."""
    g = x.index_select(0, idx)
    return g.view(len(idx), BH, x.shape[-1]).to(cdt)


def _heads_major(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups * M, BH, d) -> contiguous (BH * groups, M, d): the layout of the batched tile matmuls."""
    L, BH, d = x.shape
    return x.permute(1, 0, 2).reshape(BH * groups, L // groups, d)


class _Chunk:
    """Scores of tiles [t0, t1) and the gathered operands backward reuses.

    ``s``: (BH*c, P, U+G) block scores (masked) concatenated with the gathered ones.
    Layout: inputs and accumulators stay columns-first, (N, B*H, d), so every gather moves whole rows of
    B*H*d values; each chunk's operands are permuted to heads-major (B*H*c, P|U, d) for the tile matmuls.
    """

    def __init__(self, q, k, plan: BlockPlan, tiles: _Tiles, t0, t1, scale, BH, cdt):
        P, U, G = plan.tile, plan.key_slots, plan.gathered
        c = t1 - t0
        self.r0, self.r1 = r0, r1 = t0 * P, t1 * P
        self.keys = plan.keys[t0:t1].reshape(-1)
        self.qrow = _gather_rows(q, plan.perm[r0:r1], BH, cdt)  # (cP, BH, d)
        self.qb = _heads_major(self.qrow, c)  # (BH*c, P, d)
        self.kb = _heads_major(_gather_rows(k, self.keys, BH, cdt), c)  # (BH*c, U, d)
        s = torch.bmm(self.qb, self.kb.transpose(1, 2)).mul_(scale)  # (BH*c, P, U)
        m, self.local, self.e0, self.e1 = tiles.chunk_mask(t0, t1, cdt)
        s.view(BH, c, P, U).add_(m)
        self.kg = None
        if G:
            self.gsrc = plan.g_src[r0:r1].reshape(-1)
            self.kg = _gather_rows(k, self.gsrc, BH, cdt).view(c * P, G, BH, -1)  # (cP, G, BH, d)
            sg = (self.kg * self.qrow[:, None]).sum(-1).mul_(scale)  # (cP, G, BH)
            sg.add_(tiles.g_bias[r0:r1, :, None])
            s = torch.cat([s.view(BH, c * P, U), sg.permute(2, 0, 1)], dim=-1).view(BH * c, P, U + G)
        self.s = s


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
            tiles = _Tiles(plan, bias, wiring_weight, cdt)
            out_rows = torch.empty(R, BH, dv, dtype=cdt, device=q.device)
            edge_probs = torch.empty(BH, plan.e_slot.shape[0] if record else 0, dtype=cdt, device=q.device)
            g_probs = torch.empty(BH, R, G, dtype=cdt, device=q.device) if (G and record) else None
            wiring = torch.zeros((), dtype=cdt, device=q.device)
            entropy = torch.zeros((), dtype=cdt, device=q.device)
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                c = t1 - t0
                ch = _Chunk(q, k, plan, tiles, t0, t1, scale, BH, cdt)
                r0, r1, local, e0, e1 = ch.r0, ch.r1, ch.local, ch.e0, ch.e1
                p = torch.softmax(ch.s, dim=-1)  # (BH*c, P, U+G)
                del ch.s
                vb = _heads_major(_gather_rows(v, ch.keys, BH, cdt), c)  # (BH*c, U, dv)
                o = torch.bmm(p[..., :U] if G else p, vb).view(BH, c * P, dv).permute(1, 0, 2)  # (cP, BH, dv)
                ep = p.view(BH, -1).index_select(1, local)  # (BH, edges of the chunk)
                if record:
                    edge_probs[:, e0:e1] = ep
                wiring += torch.dot(ep.sum(0), tiles.w_block[e0:e1])
                entropy -= _plogp(ep)
                if G:
                    pg = p.view(BH, c * P, U + G)[..., U:]  # (BH, cP, G)
                    if record:
                        g_probs[:, r0:r1] = pg
                    vg = _gather_rows(v, ch.gsrc, BH, cdt).view(c * P, G, BH, dv)
                    o = o + (pg.permute(1, 2, 0).contiguous().unsqueeze(-1) * vg).sum(1)
                    wiring += (pg * tiles.g_w[r0:r1]).sum()
                    entropy -= _plogp(pg)
                out_rows[r0:r1] = o
            denom = N * BH
            wiring, entropy = wiring / denom, entropy / denom
            out = out_rows.index_select(0, plan.row_of).view(N, B, H, dv)
        ctx.save_for_backward(q, k, v, bias, wiring_weight)
        ctx.plan, ctx.chunk, ctx.cdt = plan, chunk, cdt
        ctx.mark_non_differentiable(entropy, edge_probs)
        out = out.to(torch.promote_types(q.dtype, v.dtype))
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
            tiles = _Tiles(plan, bias, wiring_weight, cdt)
            dq_rows = torch.empty(R, BH, d, dtype=cdt, device=dev) if need_q else None
            dk = torch.zeros(N, BH, d, dtype=cdt, device=dev) if need_k else None
            dvv = torch.zeros(N, BH, dv, dtype=cdt, device=dev) if need_v else None
            d_edge = torch.empty(plan.e_slot.shape[0], dtype=cdt, device=dev) if need_bias else None
            dg_bias = torch.zeros(R, G, dtype=cdt, device=dev) if (need_bias and G) else None
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                c = t1 - t0
                ch = _Chunk(q, k, plan, tiles, t0, t1, scale, BH, cdt)
                r0, r1, local, e0, e1 = ch.r0, ch.r1, ch.local, ch.e0, ch.e1
                p = torch.softmax(ch.s, dim=-1)  # recomputed, bit-identical to forward: (BH*c, P, U+G)
                del ch.s
                vb = _heads_major(_gather_rows(v, ch.keys, BH, cdt), c)  # (BH*c, U, dv)
                if g_out is not None:  # padding rows read column 0's gradient: zero them
                    gorow = _gather_rows(g_out, plan.perm[r0:r1], BH, cdt).mul_(plan.row_valid[r0:r1, None, None])
                else:
                    gorow = torch.zeros(c * P, BH, dv, dtype=cdt, device=dev)
                gob = _heads_major(gorow, c)  # (BH*c, P, dv)
                dp = torch.bmm(gob, vb.transpose(1, 2))  # (BH*c, P, U)
                if G:
                    vg = _gather_rows(v, ch.gsrc, BH, cdt).view(c * P, G, BH, dv)
                    dpg = (vg * gorow[:, None]).sum(-1)  # (cP, G, BH)
                    if gw is not None:
                        dpg.add_(gw * tiles.g_w[r0:r1, :, None])
                    dp = torch.cat([dp.view(BH, c * P, U), dpg.permute(2, 0, 1)], dim=-1).view(BH * c, P, U + G)
                if gw is not None:  # the wiring term: dA[q, e] += g * W[q, e] / (B H N)
                    dp.view(BH, -1).index_add_(1, local, (gw * tiles.w_block[e0:e1]).expand(BH, -1))
                ds = torch._softmax_backward_data(dp, p, -1, cdt)  # A * (dA - sum A dA)
                del dp
                dsb = ds[..., :U] if G else ds
                if G:
                    dsg = ds.view(BH, c * P, U + G)[..., U:].permute(1, 2, 0).contiguous()  # (cP, G, BH)
                if d_edge is not None:
                    d_edge[e0:e1] = ds.view(BH, -1).index_select(1, local).sum(0)
                    if G:
                        dg_bias[r0:r1] = dsg.sum(-1)
                if dq_rows is not None:
                    dqc = torch.bmm(dsb, ch.kb).view(BH, c * P, d).permute(1, 0, 2)  # (cP, BH, d)
                    if G:
                        dqc = dqc + (dsg.unsqueeze(-1) * ch.kg).sum(1)
                    dq_rows[r0:r1] = dqc.mul(scale)
                if dk is not None:
                    dkb = torch.bmm(dsb.transpose(1, 2), ch.qb).mul_(scale)  # (BH*c, U, d)
                    dk.index_add_(0, ch.keys, dkb.view(BH, c * U, d).transpose(0, 1).contiguous())
                    if G:
                        dkg = (dsg.unsqueeze(-1) * ch.qrow[:, None]).mul_(scale)  # (cP, G, BH, d), contiguous
                        dk.index_add_(0, ch.gsrc, dkg.view(c * P * G, BH, d))
                if dvv is not None:
                    pb = p[..., :U] if G else p
                    dvb = torch.bmm(pb.transpose(1, 2), gob)  # (BH*c, U, dv)
                    dvv.index_add_(0, ch.keys, dvb.view(BH, c * U, dv).transpose(0, 1).contiguous())
                    if G:
                        pg = p.view(BH, c * P, U + G)[..., U:].permute(1, 2, 0).contiguous()  # (cP, G, BH)
                        dvg = pg.unsqueeze(-1) * gorow[:, None]  # (cP, G, BH, dv)
                        dvv.index_add_(0, ch.gsrc, dvg.view(c * P * G, BH, dv))
            dq = dk_out = dv_out = dbias = None
            if dq_rows is not None:
                dq = dq_rows.index_select(0, plan.row_of).view(N, B, H, d).to(q.dtype)
            if dk is not None:
                dk_out = dk.view(N, B, H, d).to(k.dtype)
            if dvv is not None:
                dv_out = dvv.view(N, B, H, dv).to(v.dtype)
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
