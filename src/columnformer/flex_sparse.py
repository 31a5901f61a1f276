"""FlexAttention backend of sparse attention: the CUDA path of the block-sparse kernel.

Same math as the gather kernel (:mod:`columnformer.sparse_attention`) and the CPU block kernel
(:mod:`columnformer.block_sparse`) on the same (N, K) edges::

    score[q, e] = <Q_q, K_{index[q, e]}> / sqrt(d) + bias[q, e]
    A[q, :]     = softmax over the K edges of q;   out[q] = sum_e A[q, e] V_{index[q, e]}
    wiring      = mean_{b,h,q} sum_e W[q, e] A[q, e];   entropy = mean_{b,h,q} -sum_e A log A   (detached)

A :class:`FlexPlan` orders the columns in tiles of ``P`` nearby columns (the block kernel's
:func:`~columnformer.block_sparse.tile_order`, ``P`` = FlexAttention's block size) and turns the
edges between a query tile and a key tile into one block of a FlexAttention ``BlockMask`` when the
pair holds at least ``min_block_edges`` edges; the exact edge set is the ``mask_mod`` (a lookup
table, ``edge_of``) and each edge's learned bias is added by the ``score_mod``. The remaining edges
(long-range edges, stragglers) are a gathered part, merged with the tiles by log-sum-exp:

    lse = log(exp(lse_tiles) + sum_g exp(s_g));   out = exp(lse_tiles - lse) out_tiles + sum_g exp(s_g - lse) V_g

The wiring cost stays inside the block-sparse kernel: a second copy of every query head scores
``score + log W``, whose log-sum-exp is ``log sum_e exp(s_e) W_e``, so ``sum_e A_e W_e = exp(lse_W - lse)``
(W >= 0; W = 0 edges are clamped to 1e-30, a 1e-30 relative change); both copies run in one
FlexAttention call (grouped-query attention: 2H query heads on the H key/value heads). The entropy likewise, with
``score + log(lse - score)`` (``-log A >= 0``), in a third pass without gradient. Nothing of size
O(N K C) is saved: FlexAttention recomputes its scores in backward; the gathered part saves its
G << K gathered keys and values per column.

Runs where FlexAttention runs: compiled (``torch.compile``) on CUDA. On CPU torch 2.13 has no
FlexAttention backward and its compiled CPU kernel returns no log-sum-exp, so the sheet runs the
block kernel there (:func:`runs_on`); called directly on CPU this runs torch's eager reference,
which materialises all R x R scores (small sheets only). No GPU was available when this backend
was written: it is tested on CPU (values, and gradients through torch's eager math reference)
against the gather kernel; its speed on CUDA is unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .block_sparse import tile_order

TILE = 128  # FlexAttention's default block size (its kernels' tile on CUDA)
MIN_BLOCK_EDGES = 8  # a (query tile, key tile) pair with fewer edges is gathered (not tuned: no GPU)
_TINY = 1e-30


@dataclass(eq=False)
class FlexPlan:
    """How the FlexAttention backend visits an (N, K) edge set. Rows are columns in tile order.

    Attributes:
        tile: P, rows per tile (FlexAttention's block size); ``T`` tiles, ``R = T * P`` rows.
        perm: (R,) long, the column of each row (column 0 on padding rows, which no edge reads).
        row_of: (N,) long, the row of each column.
        kv_blocks: (T, M) int32, each query tile's key tiles, ascending, padded with ``T``.
        kv_count: (T,) int32, how many of them are real.
        edge_of: (R, M * P) int8/int16/int32, the edge number e of row r's edge to row ``kv_blocks[r // P, m] * P + j``
            at ``m * P + j``; -1 where there is none.
        row_base: (R,) long, ``perm[r] * K`` (the row's edges in flat (N * K) edge arrays).
        g_src, g_edge: (N, G) long, each column's gathered edges: source column and edge number (0 where not valid).
        g_valid: (N, G) bool.
        versions: the (index, mask) tensor versions the plan was built from (``rewire_sheet`` bumps them).
    """

    n: int
    k: int
    tile: int
    perm: torch.Tensor
    row_of: torch.Tensor
    kv_blocks: torch.Tensor
    kv_count: torch.Tensor
    edge_of: torch.Tensor
    row_base: torch.Tensor
    g_src: torch.Tensor
    g_edge: torch.Tensor
    g_valid: torch.Tensor
    min_block_edges: int
    versions: tuple = ()
    _block_mask: object = None

    @property
    def num_tiles(self) -> int:
        return self.kv_blocks.shape[0]

    @property
    def rows(self) -> int:
        return self.perm.shape[0]

    @property
    def gathered(self) -> int:
        return self.g_src.shape[1]

    def to(self, device: torch.device) -> "FlexPlan":
        tensors = ("perm", "row_of", "kv_blocks", "kv_count", "edge_of", "row_base", "g_src", "g_edge", "g_valid")
        moved = {f: getattr(self, f).to(device) for f in tensors}
        return FlexPlan(**{**self.__dict__, **moved, "_block_mask": None})

    def describe(self) -> dict:
        T, M = self.kv_blocks.shape
        return {
            "tile": self.tile, "tiles": T, "max_key_tiles": M, "key_tiles": int(self.kv_count.sum()),
            "gathered_per_column": self.gathered, "gathered_edges": int(self.g_valid.sum()),
            "min_block_edges": self.min_block_edges,
        }

    def edge_lookup(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The edge number of (query row, key row), -1 where that pair is not a tile edge.

        Elementwise on index tensors (FlexAttention traces it into its kernel): the key tile's slot in
        the query tile's list is the count of listed tiles before it (``M`` unrolled comparisons).
        """
        P = self.tile
        M = self.kv_blocks.shape[1]
        t, tk = q_idx // P, kv_idx // P
        slot = torch.zeros_like(kv_idx)
        for m in range(M):
            slot = slot + (self.kv_blocks[t, m] < tk).to(kv_idx.dtype)
        slot = torch.clamp(slot, max=M - 1)
        hit = self.kv_blocks[t, slot] == tk
        e = self.edge_of[q_idx, slot * P + kv_idx % P].to(kv_idx.dtype)
        return torch.where(hit, e, -1)

    def block_mask(self):
        """The FlexAttention ``BlockMask`` of the tile edges (built once per plan and device)."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import BlockMask

            def mask_mod(b, h, q_idx, kv_idx):
                return self.edge_lookup(q_idx, kv_idx) >= 0

            # FlexAttention's layout: (T, T) kv indices per query tile (its own O(T^2) int32), the listed first
            T, M = self.kv_blocks.shape
            listed = self.kv_blocks.new_zeros(T, T)
            listed[:, :M] = torch.where(self.kv_blocks < T, self.kv_blocks, 0)
            self._block_mask = BlockMask.from_kv_blocks(
                self.kv_count[None, None], listed[None, None], BLOCK_SIZE=self.tile, mask_mod=mask_mod,
                seq_lengths=(self.rows, self.rows),
            )
        return self._block_mask


def build_flex_plan(
    coords: np.ndarray,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    tile: int = TILE,
    min_block_edges: int = MIN_BLOCK_EDGES,
) -> FlexPlan:
    """Tiles of ``tile`` nearby columns (from ``coords`` (N, D)) and which edges of ``index``/``mask`` (N, K)
    run in FlexAttention blocks (a tile pair with >= ``min_block_edges`` edges) or are gathered."""
    if tile < 1 or min_block_edges < 1:
        raise ValueError(f"tile ({tile}) and min_block_edges ({min_block_edges}) must be >= 1")
    idx = index.detach().cpu().numpy().astype(np.int64)
    n, K = idx.shape
    valid = np.ones(idx.shape, bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
    tiles = tile_order(coords, tile)
    T, P = len(tiles), tile
    R = T * P
    perm = np.full(R, -1, dtype=np.int64)
    for t, cols in enumerate(tiles):
        perm[t * P : t * P + len(cols)] = cols
    row_of = np.empty(n, dtype=np.int64)
    row_of[perm[perm >= 0]] = np.flatnonzero(perm >= 0)
    # every valid edge as (query row, key row); the tile pair decides block or gathered
    col, e = np.nonzero(valid)
    qr, kr = row_of[col], row_of[idx[col, e]]
    qt, kt = qr // P, kr // P
    pair = qt * T + kt
    _, inv, counts = np.unique(pair, return_inverse=True, return_counts=True)
    in_block = (counts >= min_block_edges)[inv]
    # a repeated (query, source) edge can hold only one table entry: later copies are gathered
    first = np.zeros(len(col), bool)
    _, first_idx = np.unique(qr * R + kr, return_index=True)
    first[first_idx] = True
    in_block &= first
    # key tiles of each query tile, ascending
    bpairs = np.unique(pair[in_block])
    bq, bk = bpairs // T, bpairs % T
    kv_count = np.bincount(bq, minlength=T)
    M = max(1, int(kv_count.max()) if len(bpairs) else 1)
    kv_blocks = np.full((T, M), T, dtype=np.int64)
    slot_of_pair = np.arange(len(bpairs)) - np.searchsorted(bq, bq)
    kv_blocks[bq, slot_of_pair] = bk
    qb, kb, eb = qr[in_block], kr[in_block], e[in_block]
    slot = slot_of_pair[np.searchsorted(bpairs, qb // P * T + kb // P)]
    edge_dtype = np.int8 if K <= 127 else (np.int16 if K <= 32767 else np.int32)
    edge_of = np.full((R, M * P), -1, dtype=edge_dtype)
    edge_of[qb, slot * P + kb % P] = eb
    # gathered edges, per column in edge order
    gathered = np.zeros(valid.shape, bool)
    gathered[col[~in_block], e[~in_block]] = True
    G = int(gathered.sum(1).max()) if gathered.any() else 0
    g_src = np.zeros((n, G), dtype=np.int64)
    g_edge = np.zeros((n, G), dtype=np.int64)
    g_valid = np.zeros((n, G), dtype=bool)
    if G:
        c_i, e_i = np.nonzero(gathered)
        j = np.arange(len(c_i)) - np.searchsorted(c_i, c_i)
        g_src[c_i, j], g_edge[c_i, j], g_valid[c_i, j] = idx[c_i, e_i], e_i, True
    t = torch.from_numpy
    perm0 = np.where(perm >= 0, perm, 0)
    return FlexPlan(
        n=n, k=K, tile=P, perm=t(perm0), row_of=t(row_of), kv_blocks=t(kv_blocks.astype(np.int32)),
        kv_count=t(kv_count.astype(np.int32)), edge_of=t(edge_of), row_base=t(perm0 * K), g_src=t(g_src),
        g_edge=t(g_edge), g_valid=t(g_valid), min_block_edges=min_block_edges,
    )


def check_backward_supported(*tensors: torch.Tensor) -> None:
    """FlexAttention (torch 2.13) has no CPU backward: say so, and what to use instead."""
    if tensors[0].device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "sparse_kernel='flex' (FlexAttention) cannot train on CPU: torch has no FlexAttention backward there; "
            "use sparse_kernel='block' (the same math, the CPU block-sparse kernel) or run on CUDA"
        )


_COMPILED = None
EAGER_MAX_SCORES = 1 << 26  # torch's eager FlexAttention materialises B*H*R*R scores


def runs_on(device: torch.device) -> bool:
    """Whether the sheet runs this backend on ``device``: CUDA only. On CPU torch 2.13's FlexAttention has
    no backward, and its compiled CPU kernel no log-sum-exp; the sheet runs the block kernel there (the
    same tiles and math)."""
    return device.type == "cuda"


def _flex(q, k, v, score_mod, block_mask, gqa: bool = False):
    """FlexAttention with its log-sum-exp: compiled on CUDA; torch's eager math reference (all B*H*R*R
    scores, for checking small sheets) elsewhere. Returns (out (B, H, R, dv), lse (B, H, R))."""
    global _COMPILED
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _COMPILED is None:
            _COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED
    else:
        B, H, R, _ = q.shape
        if B * H * R * R > EAGER_MAX_SCORES:
            raise RuntimeError(
                f"sparse_kernel='flex' off CUDA runs torch's eager FlexAttention reference, which holds all "
                f"B*H*R*R = {B * H * R * R:,} scores; use sparse_kernel='block' (the same math) on {q.device.type}"
            )
    out, aux = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    wiring_weight: torch.Tensor,
    plan: FlexPlan,
    edge_index: torch.Tensor,
    edge_mask: torch.Tensor | None = None,
    record_attn: bool = False,
):
    """Attention over a plan's edges. Shapes as :func:`columnformer.sparse_attention.sparse_attention`;
    ``edge_index``/``edge_mask`` (N, K): the edges the plan was built from (read for ``record_attn`` only).

    Returns ``(out (N, B, H, dv), wiring, entropy, attn)``; ``attn`` (B, H, N, K) only if ``record_attn``.
    """
    N, B, H, d = q.shape
    dv = v.shape[-1]
    K = plan.k
    if plan.n != N:
        raise ValueError(f"flex plan is for {plan.n} columns, the inputs have {N}")
    if wiring_weight.shape != (N, K):
        raise ValueError(f"wiring_weight must be (N, K) = {(N, K)}, got {tuple(wiring_weight.shape)}")
    if bias is not None and bias.shape != (N, K):
        raise ValueError(f"attention bias must be (N, K) = {(N, K)}, got {tuple(bias.shape)}")
    check_backward_supported(q, k, v, *(() if bias is None else (bias,)))
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    acc = torch.promote_types(dt, torch.float32)  # log-sum-exp merge and statistics
    scale = d**-0.5

    def rows(x):  # (N, B, H, c) -> (B, H, R, c) in tile order
        return x.index_select(0, plan.perm).permute(1, 2, 0, 3).to(dt)

    qr, kr, vr = rows(q), rows(k), rows(v)
    bias_flat = bias.reshape(-1) if bias is not None else None
    logw_flat = wiring_weight.reshape(-1).to(acc).clamp_min(_TINY).log()

    def edge_bias(q_idx, kv_idx, table):
        e = plan.edge_lookup(q_idx, kv_idx)
        return table[plan.row_base[q_idx] + torch.clamp(e, min=0)]

    def with_bias(score, b, h, q_idx, kv_idx):
        return score if bias_flat is None else score + edge_bias(q_idx, kv_idx, bias_flat)

    def with_bias_and_log_wiring(score, b, h, q_idx, kv_idx):  # odd query heads: the wiring pass
        s = with_bias(score, b, h, q_idx, kv_idx)
        return s + torch.where(h % 2 == 1, edge_bias(q_idx, kv_idx, logw_flat), 0.0)

    bm = plan.block_mask()
    # one call for the output and the wiring: every query head twice (even: score + bias, odd: + log W) against
    # the same keys and values (grouped-query attention), so both log-sum-exps come from one kernel
    out2, lse2 = _flex(qr.repeat_interleave(2, dim=1), kr, vr, with_bias_and_log_wiring, bm, gqa=True)
    out_t, lse_t, lse_w = out2[:, 0::2], lse2[:, 0::2], lse2[:, 1::2]  # (B, H, R, dv), (B, H, R) x 2
    cols = plan.row_of
    out_t = out_t.index_select(2, cols).permute(2, 0, 1, 3).to(acc)  # (N, B, H, dv)
    lse_t, lse_w = (x.index_select(2, cols).permute(2, 0, 1).to(acc) for x in (lse_t, lse_w))  # (N, B, H)
    w = wiring_weight.to(acc)
    if plan.gathered:
        gv = plan.g_valid
        vg = v.index_select(0, plan.g_src.reshape(-1)).view(N, -1, B, H, dv).to(acc)  # (N, G, B, H, dv)
        g_bias = bias.gather(1, plan.g_edge) if bias is not None else None
        s_g = _edge_scores(q, k, plan.g_src, g_bias, scale, acc)  # (N, G, B, H)
        s_g = s_g.masked_fill(~gv[..., None, None], float("-inf"))
        lse = torch.logsumexp(torch.cat([lse_t[:, None], s_g], 1), dim=1)  # (N, B, H)
        a_g = torch.exp(s_g - lse[:, None])  # (N, G, B, H)
        out = out_t * torch.exp(lse_t - lse)[..., None] + (a_g[..., None] * vg).sum(1)
        w_g = w.gather(1, plan.g_edge).masked_fill(~gv, 0.0)
        wiring_rows = torch.exp(lse_w - lse) + (a_g * w_g[..., None, None]).sum(1)
    else:
        lse, out, wiring_rows = lse_t, out_t, torch.exp(lse_w - lse_t)
    wiring = wiring_rows.mean()
    with torch.no_grad():
        lse_rows = lse.detach().permute(1, 2, 0).index_select(2, plan.perm)  # (B, H, R); padding rows unused

        def with_neg_log_p(score, b, h, q_idx, kv_idx):
            s = with_bias(score, b, h, q_idx, kv_idx)
            return s + torch.clamp(lse_rows[b, h, q_idx] - s, min=_TINY).log()

        _, lse_h = _flex(qr.detach(), kr.detach(), vr.detach(), with_neg_log_p, bm)
        lse_h = lse_h.index_select(2, cols).permute(2, 0, 1).to(acc)
        ent_rows = torch.exp(lse_h - lse)
        if plan.gathered:
            ent_rows = ent_rows + (a_g * (lse[:, None] - s_g).masked_fill(~gv[..., None, None], 0.0)).sum(1)
        entropy = ent_rows.mean()
        attn = _edge_probs(q, k, bias, edge_index, edge_mask, lse, scale, acc) if record_attn else None
    return out.to(dt), wiring, entropy, attn


def _edge_scores(q, k, src, edge_bias, scale, acc):
    """Scores of each column's listed edges, (N, E, B, H): sources ``src`` (N, E), their bias (N, E) or None."""
    N, B, H, d = q.shape
    kg = k.index_select(0, src.reshape(-1)).view(N, -1, B, H, d).to(acc)  # (N, E, B, H, d)
    s = (q.to(acc)[:, None] * kg).sum(-1) * scale
    return s if edge_bias is None else s + edge_bias.to(acc)[..., None, None]


def _edge_probs(q, k, bias, edge_index, edge_mask, lse, scale, acc):
    """(B, H, N, K) attention per edge: exp(score - lse) on the K gathered keys, 0 on padding edges
    (analysis only, no gradient)."""
    s = _edge_scores(q.detach(), k.detach(), edge_index, bias.detach() if bias is not None else None, scale, acc)
    if edge_mask is not None:
        s = s.masked_fill(~edge_mask[..., None, None], float("-inf"))
    return torch.exp(s - lse[:, None]).permute(2, 3, 0, 1)
