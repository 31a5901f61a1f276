"""Chunked backward: a training step in which no weight gradient or activation of the whole sheet is ever stored.

Why. A recurrent sheet uses every weight at every step, so autograd can finish a weight's gradient only after the
backward of step 0; until the optimizer step a gradient as large as the weights lives (13.25 KiB per column of the
benchmark sheet), and a step's backward holds that step's activations for the whole sheet (~8 KiB per column).

How: two passes over the columns in chunks; exact (the gradients of autograd up to float summation order, the
optimizer's own arithmetic).

    Chunks. S = [start, stop) is a range of consecutive columns; R(S) is S with every column that reads a column of
    S; E(S) = [lo, hi) the range of columns from the first to the last one that R(S) contains or reads. A step
    recomputed on E(S) alone (``torch.func.functional_call`` with the rows E of the block's per-column parameters,
    the edges renumbered, the step's input rows E) and back-propagated from the whole sheet's output gradient on
    rows E (and the loss's derivative c_t of the step's wiring cost times |E| / N: the sub-sheet's wiring cost is a
    mean over its |E| queries) gives, on the rows S, exactly the whole sheet's gradients of S's parameters and of the
    step's input: a column s of S reaches the step's output only through its own computation and through the key
    and value it hands to the columns that read it, all in R(S), whose inputs all lie in E(S). Rows of E outside
    R(S) read no column of S; their edges to columns outside E are pointed at the row itself, which changes nothing
    on the rows S.
    A. The sheet's forward runs every step without a graph (``Columnformer.run_steps_with``), keeping only the
       step's input h_t (N, B, C). Backward through time then takes each step chunk by chunk: from the gradient g_t of
       the step's output it assembles dL/dh_t from the chunks' rows S and records g_t and c_t. Everything outside the
       steps (position and time embedding, input injection, a task head) is differentiated by autograd as usual;
       the blocks' per-column parameters get no gradient in this pass.
    B. For each chunk S: every step recomputed on E(S) and back-propagated from g_t, the per-column parameters' rows
       E accumulating their gradients over the steps (untied linears add the rows S into one buffer:
       ``untied_session(accumulate=..., rows=...)``); the optimizer then steps the rows S (:func:`optim.step_part`: AdamW is elementwise,
       block-wise with 8-bit moments, its rounding noise counted per element of the parameter with bf16 moments)
       and the chunk's gradients are freed. A later chunk's E may reach back into S: those rows of S keep their old
       values in the sheet, their new values wait in a copy until the last chunk reading them is done.
    Then ``optimizer.step()`` steps the other parameters, whose gradients pass A left.

Memory: weights, optimizer state, 2 T activation-sized tensors (h_t, g_t) and one chunk's working set. Cost: the
forward once without a graph, pass A's steps once more with input gradients and pass B's with weight gradients, each
on E(S) (|E| / |S| ~1.3-2 for local edges on a grid in column order; bands of >= 32 grid rows keep it <= 1.6).
Long-range edges make E(S) most of the sheet (correct, but slow): the option is for local connectivity.

Not supported (refused by :func:`check_supported`, naming the option): halting, weight banks (mixture), learned
positions, per-head linmixing bias, tied block layers, dense connectivity; with the trainer also gradient clipping
(the norm of the whole gradient is known only after every chunk has stepped), accumulation, torchrun and reduced
precision; and optimizers other than AdamW (torch's, or :class:`columnformer.optim.AdamW` with bf16 or 8-bit
moments).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import optim as optim_parts
from .attention import ColumnAttention
from .attention_stats import AttentionStats
from .block_sparse import BlockPlan, build_block_plan
from .flex_sparse import FlexPlan, build_flex_plan
from .fused_sparse import FusedPlan, build_fused_plan
from .layers import UntiedLayerNorm, UntiedLinear, untied_session

ALIGN = 256  # chunk boundaries are multiples of this many columns (8-bit moments: whole blocks of 256 elements)


def per_column_block_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the sheet's blocks that hold one row per column (untied linears and layer norms, the
    per-edge bias, static queries): ``{"blocks.0.attn.q.weight": p, ...}``. Pass B computes their gradients."""
    out = {}
    for name, module in model.blocks.named_modules():
        if isinstance(module, (UntiedLinear, UntiedLayerNorm)):
            for pname, p in module.named_parameters(recurse=False):
                out[f"blocks.{name}.{pname}"] = p
        elif isinstance(module, ColumnAttention):
            for pname in ("bias", "query"):
                p = getattr(module, pname)
                if p is not None:
                    out[f"blocks.{name}.{pname}"] = p
    return out


def check_supported(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise ValueError naming the option when the chunked backward cannot run this sheet (or optimizer)."""
    cfg = model.cfg
    refused = [
        (model.edge_index is None, "a dense connectivity (every chunk would read the whole sheet): use a sparse one"),
        (cfg.halting != "none", f"halting={cfg.halting}: set halting=none"),
        (cfg.mixture != "none", f"mixture={cfg.mixture}: set mixture=none"),
        (cfg.learn_positions, "learn_positions=true: set it to false"),
        (cfg.attn_head_bias, "attn_head_bias=true: set it to false"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"train.chunked_backward cannot run a sheet with {why}, or turn chunked_backward off")
    per_column = per_column_block_parameters(model)
    tied = [f"blocks.{name}" for name, p in model.blocks.named_parameters() if f"blocks.{name}" not in per_column]
    if tied:
        raise ValueError(
            f"train.chunked_backward needs every block parameter to be per-column (untied_attn, untied_mlp and "
            f"untied_norm true); {', '.join(tied[:3])} is shared by all columns"
        )
    for name, p in per_column.items():
        if p.shape[0] != model.n:
            raise ValueError(f"train.chunked_backward: {name} has {p.shape[0]} rows, not one per column ({model.n})")
    if optimizer is not None:
        optim_parts.check_partial(optimizer)


@dataclass
class Chunk:
    """One chunk: columns S = [start, stop), recomputed on the range E = [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int


def plan_chunks(edge_index: torch.Tensor, edge_mask: torch.Tensor, chunk_columns: int) -> list[Chunk]:
    """Consecutive chunks of ``chunk_columns`` columns (rounded up to a multiple of :data:`ALIGN`) and the range
    E(S) each must be recomputed on: every column of R(S) (S and the columns reading S) and every column they read."""
    n = edge_index.shape[0]
    size = max(ALIGN, -(-chunk_columns // ALIGN) * ALIGN)
    rows = torch.arange(n, device=edge_index.device)
    chunks = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        readers = ((edge_index >= start) & (edge_index < stop) & edge_mask).any(1)
        readers[start:stop] = True
        read = edge_index[readers][edge_mask[readers]]
        lo = min(int(rows[readers].min()), int(read.min()) if read.numel() else start)
        hi = max(int(rows[readers].max()), int(read.max()) if read.numel() else stop - 1) + 1
        chunks.append(Chunk(start, stop, lo, hi))
    return chunks


class _SubSheet:
    """One chunk's part of the sheet: the columns E = [lo, hi) with the edges renumbered (sources outside E, only on
    rows outside R(S), point at the row itself), their wiring weights and a kernel plan."""

    def __init__(self, model, chunk: Chunk, plan):
        lo, hi = chunk.lo, chunk.hi
        self.chunk, self.n = chunk, model.n
        index = model.edge_index[lo:hi] - lo  # (E, K)
        own = torch.arange(hi - lo, device=index.device).unsqueeze(1)
        self.index = torch.where((index >= 0) & (index < hi - lo), index, own)
        self.mask = model.edge_mask[lo:hi]
        self.wiring_weight = model.wiring_weight[lo:hi]
        self.plan = _sub_plan(plan, model.geometry.coords[lo:hi], self.index, self.mask)

    def backward(self, block, params: dict, x: torch.Tensor, g: torch.Tensor | None, c: float,
                 inputs: tuple = (), accumulate: dict | None = None, rows: slice | None = None) -> tuple | None:
        """Recompute ``block`` on rows E of the step input ``x`` (E, B, C) with the rows E of its per-column
        ``params``; back-propagate ``g`` (the whole sheet's output gradient (N, B, C), on rows E) and
        ``c`` (the loss's derivative of the step's wiring cost). Gradients go to ``inputs`` (returned) or, when it is
        empty, into the ``.grad`` of the leaves among ``params`` -- for untied linears into their buffers in
        ``accumulate`` (``{id(leaf): buffer}`` holding the sub-sheet's ``rows``, see :func:`layers.untied_session`)."""
        lo, hi = self.chunk.lo, self.chunk.hi
        with untied_session(fuse=False, accumulate=accumulate, rows=rows):
            y, stats, _ = torch.func.functional_call(
                block, params, (x, self.wiring_weight, self.index, self.mask, frozenset(), self.plan)
            )
        outs, grads = [], []
        if g is not None:
            outs.append(y)
            grads.append(g[lo:hi])  # (E, B, C); the rows outside R(S) reach no weight or input of S
        if c != 0.0 and stats.wiring.requires_grad:
            outs.append(stats.wiring)
            grads.append(torch.tensor(c * (hi - lo) / self.n, dtype=stats.wiring.dtype))  # a mean over E queries
        if not outs:
            return tuple(torch.zeros_like(i) for i in inputs) if inputs else None
        if inputs:
            return torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        torch.autograd.backward(outs, grads)
        return None


class _Engine:
    """State of one chunked training step: per step t its input h_t, output gradient g_t and wiring derivative c_t."""

    def __init__(self, model, chunks: list[Chunk], input_chunks: list[Chunk]):
        self.model = model
        self.inputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.wiring: dict[int, float] = {}
        self.plan = model.block_plan()
        self.linear = {id(m.weight) for m in model.blocks.modules() if isinstance(m, UntiedLinear)} | {
            id(m.bias) for m in model.blocks.modules() if isinstance(m, UntiedLinear) and m.bias is not None}
        self.chunks, self.input_chunks = chunks, input_chunks
        self.input_subs: dict[int, _SubSheet] = {}  # pass A's sub-sheets, kept over its steps

    def params(self, t: int) -> tuple[nn.Module, dict]:
        """Step t's block and its per-column parameters (all N rows): ``{name in the block: (name in the sheet, p)}``."""
        model = self.model
        prefix = "blocks.0." if model.cfg.recurrent else f"blocks.{t}."
        block = model.blocks[0 if model.cfg.recurrent else t]
        return block, {name[len(prefix):]: (name, p) for name, p in per_column_block_parameters(model).items()
                       if name.startswith(prefix)}

    def run(self, t, block, h, record, plan, wiring_weight):
        """The sheet's step runner (:meth:`Columnformer.run_steps_with`)."""
        if record:
            raise ValueError("chunked backward records nothing (record=...): run the forward without it")
        if t in self.inputs:
            raise RuntimeError("chunked backward: the loss closure ran the sheet more than once; run it once per step")
        out, wiring, entropy = _ChunkedStep.apply(h, self, t, block, plan, wiring_weight)
        return out, AttentionStats(wiring, entropy, None), None

    def input_grad(self, t: int, block, h: torch.Tensor, g: torch.Tensor, c: float) -> torch.Tensor:
        """dL/dh_t of the whole sheet, chunk by chunk (each chunk's rows S from its recomputation on E(S))."""
        _, full = self.params(t)
        dh = torch.empty_like(h)
        for j, ch in enumerate(self.input_chunks):
            sub = self.input_subs.get(j)
            if sub is None:
                sub = self.input_subs[j] = _SubSheet(self.model, ch, self.plan)
            x = h[ch.lo:ch.hi].detach().requires_grad_()
            params = {name: p.detach()[ch.lo:ch.hi] for name, (_, p) in full.items()}
            (dx,) = sub.backward(block, params, x, g, c, (x,))
            dh[ch.start:ch.stop] = dx[ch.start - ch.lo:ch.stop - ch.lo] if dx is not None else 0
            del sub, x, dx
        return dh


class _ChunkedStep(torch.autograd.Function):
    """One step of the sheet, run without a graph; its backward records (h_t, g_t, c_t) for pass B and returns
    dL/dh_t computed chunk by chunk. The per-column parameters get no gradient here (pass B computes them)."""

    @staticmethod
    def forward(ctx, h, engine: "_Engine", t: int, block, plan, wiring_weight):
        with torch.no_grad():
            out, stats, _ = block(h, wiring_weight, engine.model.edge_index, engine.model.edge_mask, frozenset(), plan)
        engine.inputs[t] = h.detach()
        ctx.engine, ctx.t, ctx.block = engine, t, block
        ctx.save_for_backward(h)
        entropy = stats.entropy.detach().clone()
        ctx.mark_non_differentiable(entropy)
        return out, stats.wiring.detach().clone(), entropy

    @staticmethod
    def backward(ctx, g_out, g_wiring, _g_entropy):
        (h,) = ctx.saved_tensors
        engine, t = ctx.engine, ctx.t
        c = float(g_wiring) if g_wiring is not None else 0.0
        engine.grads[t], engine.wiring[t] = g_out, c
        with torch.enable_grad():
            dh = engine.input_grad(t, ctx.block, h, g_out, c)
        return dh, None, None, None, None, None


def _sub_plan(plan, coords, index: torch.Tensor, mask: torch.Tensor):
    if plan is None:
        return None
    build = {FusedPlan: build_fused_plan, BlockPlan: build_block_plan, FlexPlan: build_flex_plan}[type(plan)]
    return build(coords, index, mask).to(index.device)


class ChunkedBackward:
    """The chunked backward for one sheet and optimizer; a training step is::

        cb = ChunkedBackward(sheet, optimizer, chunk_columns=8192)
        with cb.forward():                  # the sheet's steps run without a graph
            loss = loss_of(sheet(tokens))   # once per training step
        cb.backward(loss)                   # pass A, then pass B: per-column parameters stepped chunk by chunk
        optimizer.step()                    # the other parameters (their gradients came from pass A)
        optimizer.zero_grad(set_to_none=True)

    Args:
        sheet: the :class:`Columnformer` (a task head or any other module may sit around it: its parameters get
            their gradients in pass A and their step from ``optimizer.step()``).
        optimizer: AdamW (``torch.optim.AdamW``, or :class:`columnformer.optim.AdamW` with bf16 or 8-bit moments)
            holding the sheet's per-column parameters.
        chunk_columns: columns per chunk of pass B (rounded up to a multiple of 256): its memory is about this many
            columns' weight gradients and one step's activations, its extra work the chunks' overlap.
        input_chunk_columns: columns per chunk of pass A's backward through time (no weight gradients: cheaper per
            column, so larger chunks, less overlap); default 2 x ``chunk_columns``.
        on_gradient: called as ``on_gradient(name, start, grad)`` with each chunk's gradient rows of each per-column
            parameter before the optimizer uses them (tests compare them with autograd's).
    """

    def __init__(self, sheet: nn.Module, optimizer: torch.optim.Optimizer, chunk_columns: int = 8192,
                 input_chunk_columns: int | None = None, on_gradient: Callable | None = None):
        if chunk_columns < 1 or (input_chunk_columns is not None and input_chunk_columns < 1):
            raise ValueError(f"chunk sizes must be >= 1 column (got {chunk_columns}, {input_chunk_columns})")
        check_supported(sheet, optimizer)
        self.sheet, self.optimizer, self.on_gradient = sheet, optimizer, on_gradient
        self.chunk_columns = chunk_columns
        self.input_chunk_columns = input_chunk_columns or 2 * chunk_columns
        self._engine: _Engine | None = None
        self._planned: tuple | None = None  # (edge buffers' versions, chunks of pass B, chunks of pass A)

    def _chunks(self) -> tuple[list[Chunk], list[Chunk]]:
        """Both passes' chunks, planned once and again only when the edge buffers change (rewiring)."""
        index, mask = self.sheet.edge_index, self.sheet.edge_mask
        versions = (index._version, mask._version, index.data_ptr(), mask.data_ptr())
        if self._planned is None or self._planned[0] != versions:
            self._planned = (versions, plan_chunks(index, mask, self.chunk_columns),
                             plan_chunks(index, mask, self.input_chunk_columns))
        return self._planned[1], self._planned[2]

    @contextlib.contextmanager
    def forward(self):
        """Run the sheet's forward inside this context (once per step): its steps then keep no graph."""
        self._engine = _Engine(self.sheet, *self._chunks())
        with self.sheet.run_steps_with(self._engine.run):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Pass A (``loss.backward()``: every parameter but the sheet's per-column ones gets its gradient) and pass B
        (the per-column parameters' gradients chunk by chunk, each chunk stepped by the optimizer at once)."""
        engine = self._engine
        if engine is None or not engine.inputs:
            raise RuntimeError("ChunkedBackward.backward: run the sheet's forward inside ChunkedBackward.forward() first")
        self._engine = None
        if loss.requires_grad:
            loss.backward()
        engine.input_subs.clear()
        trainable = {name: p for name, p in per_column_block_parameters(self.sheet).items() if p.requires_grad}
        for p in trainable.values():
            optim_parts.begin_parts(self.optimizer, p)
        if trainable:
            _pass_b(engine, self.optimizer, trainable, self.on_gradient)


def chunked_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                 chunk_columns: int = 8192, input_chunk_columns: int | None = None,
                 on_gradient: Callable | None = None) -> torch.Tensor:
    """One whole training step of sheet ``model`` with the chunked backward (:class:`ChunkedBackward`): ``loss_fn()``
    runs the forward once and returns the scalar loss; afterwards every gradient is None. Returns the loss, detached."""
    cb = ChunkedBackward(model, optimizer, chunk_columns, input_chunk_columns, on_gradient)
    with cb.forward():
        loss = loss_fn()
    cb.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _pass_b(engine: _Engine, optimizer, trainable: dict, on_gradient) -> None:
    model, chunks = engine.model, engine.chunks
    steps = len(engine.inputs)
    pending: list[tuple[int, int, int, list]] = []  # (first row, stop row, last chunk reading them, [(p, new rows)])
    for j, ch in enumerate(chunks):
        lo, hi = ch.lo, ch.hi
        sub = _SubSheet(model, ch, engine.plan)
        leaves: dict[str, torch.Tensor] = {}
        buffers: dict[int, torch.Tensor] = {}  # id(leaf) -> the untied linear's weight gradient rows E, summed over steps
        for t in range(steps):
            g, c = engine.grads.get(t), engine.wiring.get(t, 0.0)
            block, full = engine.params(t)
            params = {}
            for name, (sheet_name, p) in full.items():
                if sheet_name in trainable:
                    if sheet_name not in leaves:
                        leaf = leaves[sheet_name] = p.detach()[lo:hi].requires_grad_()
                        if id(p) in engine.linear:  # the rows S only
                            buffers[id(leaf)] = torch.zeros_like(leaf[ch.start - lo:ch.stop - lo])
                    params[name] = leaves[sheet_name]
                else:
                    params[name] = p.detach()[lo:hi]
            sub.backward(block, params, engine.inputs[t][lo:hi], g, c, accumulate=buffers,
                         rows=slice(ch.start - lo, ch.stop - lo))
        del sub
        # rows of S that a later chunk reads: stepped in a copy, written back after that chunk
        later = [k for k in range(j + 1, len(chunks)) if chunks[k].lo < ch.stop]
        split = ch.stop if not later else max(ch.start, min(chunks[k].lo for k in later) // ALIGN * ALIGN)
        waiting, grad = [], None
        for name, p in trainable.items():
            leaf = leaves.get(name)
            if leaf is None or (id(leaf) not in buffers and leaf.grad is None):
                continue
            grad = buffers[id(leaf)] if id(leaf) in buffers else leaf.grad[ch.start - lo:ch.stop - lo]  # (|S|, ...)
            if on_gradient is not None:
                on_gradient(name, ch.start, grad)
            row = p[0].numel()
            with torch.no_grad():
                if split > ch.start:
                    optim_parts.step_part(optimizer, p, ch.start * row, grad[: split - ch.start],
                                          p.data[ch.start:split])
                if split < ch.stop:
                    new = p.data[split:ch.stop].clone()
                    optim_parts.step_part(optimizer, p, split * row, grad[split - ch.start:], new)
                    waiting.append((p, new))
        del leaves, buffers, grad
        if waiting:
            pending.append((split, ch.stop, max(later), waiting))
        still = []
        for first, stop, until, values in pending:
            if until <= j:
                with torch.no_grad():
                    for p, new in values:
                        p.data[first:stop].copy_(new)
            else:
                still.append((first, stop, until, values))
        pending = still
    if pending:  # cannot happen: every waiting range names a chunk that has run
        raise RuntimeError("chunked backward: rows left unwritten")
