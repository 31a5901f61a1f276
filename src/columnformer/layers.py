"""Per-column layers: every column of the sheet owns its parameters.

Activations use the column-major layout ``(N, B, C)`` so an untied linear layer is one
batched matmul (``baddbmm``) over the N columns, never a Python loop. The tied versions
(plain ``nn.Linear`` / ``nn.LayerNorm``) act on the same layout, so a block can mix them.

Fast path for unrolled sheets (``untied_session``). A recurrent sheet applies the same untied
layer T times; plain autograd then computes T weight gradients with M = B rows each. Inside an
``untied_session`` (entered by ``Columnformer.forward``) every untied layer's weight passes once
through a *tap* (an identity autograd node, which also casts it once to the autocast dtype and, when the
forward reuses the layers (``untied_session(fuse=True)``: an unrolled recurrent sheet), concatenates layers
that read the same input, e.g. query and key, into one matmul), and each use returns only its
input gradient and hands ``(x_t, g_t)`` to the layer's *stash*. The tap's backward, which autograd
runs after every use's backward, returns ``dW = sum_t x_t^T g_t``. In float32/float64 the stash adds
each use's ``x_t^T g_t`` into one gradient buffer as it arrives (``baddbmm_``: no concatenation, and
x_t, g_t are freed at once); in low precision (bf16/fp16) it keeps the pairs and sums them inside one
batched GEMM with M = T*B rows, so the sum over steps is accumulated in float32 inside the GEMM and
rounded once. The math is unchanged either way.

C++ kernels (``csrc/column_ops.cpp``, built by :mod:`columnformer.native`). In float32/float64 on CPU the untied
linear's forward, its backward (input gradient and the stashed weight gradient in one pass per column) and the
layer norm with a per-column affine run as C++ loops over columns instead of torch's batched GEMM (which packs
both operands of every 8-row product) and five or six elementwise passes; the same math, tested equal. Torch's
ops remain the path on GPUs, in bf16/fp16 (autocast), under ``torch.compile``, where the kernels cannot be built,
and inside ``native_kernels(False)``.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import native

INIT_STD = 0.02

_LOCAL = threading.local()
_NATIVE = {"enabled": True}


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """Run the per-column layers with (True) or without (False) the C++ kernels of :mod:`columnformer.native`
    inside this context (default: with them, where they apply). The same math either way; for comparisons."""
    previous = _NATIVE["enabled"]
    _NATIVE["enabled"] = enabled
    try:
        yield
    finally:
        _NATIVE["enabled"] = previous


def _native_for(*tensors: torch.Tensor | None):
    """The C++ kernels' module when they apply to these tensors (CPU, float32/float64, one dtype, built), else None."""
    if not _NATIVE["enabled"] or torch.compiler.is_compiling():  # torch.compile traces the torch ops instead
        return None
    ts = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.dtype != ts[0].dtype for t in ts):
        return None
    return native.load()


class _Stash:
    """What the uses of one tapped layer hand to its tap's backward, per autograd graph task.

    ``uses``: (task, x, g) pairs kept for one batched GEMM (low precision); ``sums``: task -> running
    per-layer weight gradients (and bias gradient) accumulated use by use (float32 / float64).
    """

    def __init__(self, splits: list[int], bias: bool, into: list[torch.Tensor] | None = None, rows: slice | None = None):
        self.splits, self.bias, self.into, self.rows = splits, bias, into, rows
        self.uses: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.sums: dict[int, list[torch.Tensor]] = {}

    def add(self, task: int, x: torch.Tensor, g: torch.Tensor) -> None:
        if x.dtype not in (torch.float32, torch.float64) or g.dtype != x.dtype:
            if self.into is not None:
                raise RuntimeError("untied_session(accumulate=...) needs float32/float64 uses")
            self.uses.append((task, x, g))
            return
        if self.rows is not None:  # the caller's buffers hold these columns only
            x, g = x[self.rows], g[self.rows]
        xt = x.transpose(1, 2)  # (N, in, B)
        parts = g.split(self.splits, dim=-1) if len(self.splits) > 1 else (g,)
        sums = self.sums.get(task)
        if sums is None and self.into is not None:  # add into the caller's buffers
            sums = self.sums[task] = list(self.into)
        if sums is None:  # one GEMM per layer, so every gradient is born contiguous
            self.sums[task] = [torch.bmm(xt, p) for p in parts] + ([g.sum(1)] if self.bias else [])
            return
        for acc, p in zip(sums, parts):
            acc.baddbmm_(xt, p)
        if self.bias:
            sums[-1].add_(g.sum(1))

    def add_native(self, ext, task: int, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, need_dx: bool,
                   gelu_input: bool = False):
        """:meth:`add` and the input gradient ``g @ w^T`` in one pass of the C++ kernel (float32/float64 on CPU);
        returns the input gradient (None unless ``need_dx``). ``gelu_input``: x is the pre-activation h of a layer
        that read GELU(h) (see :class:`_UntiedUse`)."""
        N, _, I = x.shape
        sums = self.sums.get(task)
        if sums is None and self.into is not None:  # add into the caller's buffers
            sums = self.sums[task] = list(self.into)
        if self.rows is not None:  # buffers of some columns: the input gradient of all, then their weight gradient
            r = self.rows
            dx = ext.linear_backward(x, w, g, [], x.new_empty(0), True, False, gelu_input) if need_dx else None
            db = sums[-1] if self.bias else x.new_empty(0)
            ext.linear_backward(x[r], w[r], g[r], sums[:-1] if self.bias else sums, db, False, True, gelu_input)
            return dx
        first = sums is None
        if first:  # one buffer per layer, so every gradient is born contiguous
            sums = [x.new_empty(N, I, o) for o in self.splits] + ([x.new_empty(N, sum(self.splits))] if self.bias else [])
            self.sums[task] = sums
        db = sums[-1] if self.bias else x.new_empty(0)
        dws = sums[:-1] if self.bias else sums
        dx = ext.linear_backward(x, w, g, dws, db, need_dx, not first, gelu_input)
        return dx if need_dx else None


class _Session:
    """Per-forward cache of tapped (cast / concatenated) weights of untied layers. ``fuse``: concatenate the
    weights of layers that read the same input (worth it when the forward reuses them; a copy otherwise)."""

    def __init__(self, fuse: bool = True, accumulate: dict | None = None, rows: slice | None = None) -> None:
        self.fuse = fuse
        self.accumulate, self.rows = accumulate or {}, rows
        self.taps: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None, _Stash]] = {}


@contextlib.contextmanager
def untied_session(fuse: bool = True, accumulate: dict | None = None, rows: slice | None = None):
    """Within this context every untied layer defers its weight gradient to one batched GEMM.

    Enter it once per forward pass of a model that reuses its untied layers (the sheet does).
    ``fuse=False``: layers that read the same input stay separate matmuls (no weight concatenation: a
    feed-forward sheet uses each layer once, so the concatenated copy would not pay for itself).
    ``accumulate``: ``{id(weight tensor): buffer}``; a layer whose weight (and bias) tensors all have a buffer adds
    its weight gradients into them (float32/float64) and hands autograd none: backward passes over several graphs
    then sum into one buffer without a gradient-sized temporary per pass (``chunked_backward``). ``rows``: the
    buffers hold only these columns' gradients (a slice of the N columns); the input gradient is still every column's.
    Nesting reuses the outer session.
    """
    if getattr(_LOCAL, "session", None) is not None:
        yield _LOCAL.session
        return
    _LOCAL.session = _Session(fuse, accumulate, rows)
    try:
        yield _LOCAL.session
    finally:
        _LOCAL.session = None


def current_session() -> "_Session | None":
    """The untied session of the forward pass in progress (None outside one)."""
    return getattr(_LOCAL, "session", None)


@contextlib.contextmanager
def reuse_session(session: "_Session | None"):
    """Make ``session`` current again, e.g. while activation checkpointing recomputes a step in backward:
    the recomputed uses then find the same tapped weights (and stash), so the recomputed graph matches."""
    previous = getattr(_LOCAL, "session", None)
    _LOCAL.session = session
    try:
        yield session
    finally:
        _LOCAL.session = previous


def _compute_dtype(ref: torch.Tensor) -> torch.dtype:
    dev = ref.device.type
    if torch.is_autocast_enabled(dev) and ref.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return ref.dtype


class _Tap(torch.autograd.Function):
    """Identity on the (concatenated, cast) weights; its backward sums all stashed uses at once."""

    @staticmethod
    def forward(ctx, stash, dtype, splits, n_w, *params):
        ctx.set_materialize_grads(False)
        ctx.stash, ctx.splits, ctx.n_w = stash, splits, n_w
        ctx.w_dtypes = [p.dtype for p in params]
        weights, biases = params[:n_w], params[n_w:]
        w = weights[0].to(dtype) if n_w == 1 else torch.cat([p.to(dtype) for p in weights], dim=-1)
        if w is weights[0]:
            w = w.view_as(w)  # a custom Function must not return an input as is
        if biases:
            b = biases[0].to(dtype) if n_w == 1 else torch.cat([p.to(dtype) for p in biases], dim=-1)
            if b is biases[0]:
                b = b.view_as(b)
        else:
            b = None
        return w, b

    @staticmethod
    def backward(ctx, gw, gb):
        tid = torch._C._current_graph_task_id()
        stash: _Stash = ctx.stash
        mine = [(x, g) for (t, x, g) in stash.uses if t == tid]
        stash.uses.clear()
        sums = stash.sums.pop(tid, None)
        n_w, splits = ctx.n_w, ctx.splits
        n_b = len(ctx.w_dtypes) - n_w
        if (not mine and sums is None) or stash.into is not None:  # nothing, or added into the session's buffers
            return (None, None, None, None) + (None,) * (n_w + n_b)
        dws: list[torch.Tensor] = []
        dbs: list[torch.Tensor] = []
        if mine:
            if len(mine) == 1:
                x, g = mine[0]
            else:  # all uses in one GEMM: M = (number of uses) * B
                x = torch.cat([x for x, _ in mine], dim=1)
                g = torch.cat([g for _, g in mine], dim=1)
            xt = x.transpose(1, 2)
            # one GEMM per layer, so every gradient is born contiguous (no copy in AccumulateGrad)
            dws = [torch.bmm(xt, gs) for gs in g.split(splits, dim=-1)] if n_w > 1 else [torch.bmm(xt, g)]
            if n_b:
                db = g.sum(1, dtype=torch.promote_types(g.dtype, torch.float32))
                dbs = list(db.split(splits, dim=-1)) if n_w > 1 else [db]
        if sums is not None:
            dws = sums[:n_w] if not dws else [a + b.to(a.dtype) for a, b in zip(sums[:n_w], dws)]
            if n_b:
                acc_b = list(sums[n_w].split(splits, dim=-1)) if n_w > 1 else [sums[n_w]]
                dbs = acc_b if not dbs else [a + b.to(a.dtype) for a, b in zip(acc_b, dbs)]
        if gw is not None:  # direct use of the tapped weight elsewhere (not done by the library)
            dws = [d + e for d, e in zip(dws, gw.split(splits, dim=-1))]
        if gb is not None and n_b:
            dbs = [d + e for d, e in zip(dbs, gb.split(splits, dim=-1))]
        grads = [d.to(t) for d, t in zip(dws, ctx.w_dtypes[:n_w])]
        grads += [d.to(t) for d, t in zip(dbs, ctx.w_dtypes[n_w:])]
        return (None, None, None, None) + tuple(grads)


class _UntiedUse(torch.autograd.Function):
    """``y = x @ W + b`` per column; backward returns dX now and stashes (x, dY) for the tap.

    ``gelu_input``: the layer reads GELU(x) (the MLP's second layer fed its first layer's pre-activation x):
    ``y = GELU(x) @ W + b``, saving only x; GELU(x) is recomputed where the weight gradient needs it (inside the C++
    kernels: per column in cache), so the MLP stores one (N, B, hidden) tensor per use instead of two."""

    @staticmethod
    def forward(ctx, x, w, b, stash, gelu_input=False):
        x = x.to(w.dtype)
        y = _linear(x, w, b, gelu_input)
        ctx.stash, ctx.gelu_input = stash, gelu_input
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx = _use_backward(x, w, g, ctx.stash, need_w, ctx.needs_input_grad[0], ctx.gelu_input)
        return dx, None, None, None, None


def _use_backward(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, stash: _Stash, need_w: bool, need_dx: bool,
                  gelu_input: bool = False):
    """One use's backward: hand (x, g) to the stash (its weight gradient) and return ``g @ w^T`` (None unless
    ``need_dx``); one C++ pass where the kernels apply. ``gelu_input``: the use read GELU(x) (see
    :class:`_UntiedUse`); the stash then gets (GELU(x), g) and the input gradient is ``(g @ w^T) * GELU'(x)``."""
    ext = _native_for(x, w, g)
    if ext is not None and w.is_contiguous():  # dx and the stashed weight gradient in one C++ pass
        x, g = x.contiguous(), g.contiguous()
        if need_w:
            return stash.add_native(ext, torch._C._current_graph_task_id(), x, w, g, need_dx, gelu_input)
        return ext.linear_backward(x, w, g, [], x.new_empty(0), True, False, gelu_input) if need_dx else None
    if need_w:
        stash.add(torch._C._current_graph_task_id(), F.gelu(x) if gelu_input else x, g)
    if not need_dx:
        return None
    dx = torch.bmm(g, w.transpose(1, 2))
    return torch.ops.aten.gelu_backward(dx, x) if gelu_input else dx


class _RecomputedMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` on two tapped untied layers, saving only x: the hidden pre-activation and the GELU
    output ((N, B, hidden) each) are recomputed in backward (one more fc1 forward) instead of stored."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, stash1, stash2):
        x = x.to(w1.dtype)
        y = _linear(_linear(x, w1, b1), w2, b2, gelu_input=True)
        ctx.stashes = (stash1, stash2)
        ctx.save_for_backward(x, w1, b1, w2)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w1, b1, w2 = ctx.saved_tensors
        stash1, stash2 = ctx.stashes
        h = _linear(x, w1, b1)  # (N, B, hidden), recomputed
        dh = _use_backward(h, w2, g, stash2, ctx.needs_input_grad[3] or ctx.needs_input_grad[4], True, gelu_input=True)
        del h
        need_w1 = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        return _use_backward(x, w1, dh, stash1, need_w1, ctx.needs_input_grad[0]), None, None, None, None, None, None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu_input: bool = False) -> torch.Tensor:
    """``x @ w + b`` per column (``GELU(x) @ w + b`` with ``gelu_input``): x (N, B, in), w (N, in, out), b (N, out)
    or None -> (N, B, out); the C++ kernel where it applies (:func:`native_kernels`), else torch's batched GEMM.
    Autograd does not see through the C++ kernel: call it inside an autograd Function's forward/backward (as
    ``_UntiedUse``) or where no gradient is needed, never on a differentiable path directly."""
    ext = _native_for(x, w, b)
    if ext is not None and w.is_contiguous() and (b is None or b.is_contiguous()):
        return ext.linear_forward(x.contiguous(), w, b if b is not None else x.new_empty(0), gelu_input)
    if gelu_input:
        x = F.gelu(x)
    return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)


def untied_linear_fused(x: torch.Tensor, layers: list["UntiedLinear"]) -> list[torch.Tensor]:
    """Apply several untied linears to the same input x (N, B, in); one matmul inside a session.

    Returns one (N, B, out_i) tensor per layer (views of one result when fused). Outside an
    ``untied_session`` this is just ``[layer(x) for layer in layers]``.
    """
    session = getattr(_LOCAL, "session", None)
    has_bias = {layer.bias is not None for layer in layers}
    if session is None or len(has_bias) > 1:
        return [layer(x) for layer in layers]
    if not session.fuse and len(layers) > 1:
        return [untied_linear_fused(x, [layer])[0] for layer in layers]
    for layer in layers:
        layer._check(x)
    if torch.autograd._profiler_enabled():  # a named region for benchmarks/train_step.py's breakdown
        with torch.autograd.profiler.record_function("cf::untied"):
            return _fused(x, layers, session, True in has_bias)
    return _fused(x, layers, session, True in has_bias)


def _tap(layers: list["UntiedLinear"], session: _Session, bias: bool):
    """(tapped weight, tapped bias or None, stash) of these layers in this session (tapped on first use)."""
    key = tuple(id(layer) for layer in layers)
    if key not in session.taps:
        splits = [layer.out_features for layer in layers]
        params = [layer.weight for layer in layers] + ([layer.bias for layer in layers] if bias else [])
        into = [session.accumulate.get(id(p)) for p in params]
        use = len(layers) == 1 and all(b is not None for b in into)
        stash = _Stash(splits, bias, into if use else None, session.rows if use else None)
        w, b = _Tap.apply(stash, _compute_dtype(layers[0].weight), splits, len(layers), *params)
        session.taps[key] = (w, b, stash)
    return session.taps[key]


def _fused(x: torch.Tensor, layers: list["UntiedLinear"], session: _Session, bias: bool) -> list[torch.Tensor]:
    w, b, stash = _tap(layers, session, bias)
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        y = _UntiedUse.apply(x, w, b, stash)
    else:
        y = _linear(x.to(w.dtype), w, b)
    if len(layers) == 1:
        return [y]
    return list(y.split([layer.out_features for layer in layers], dim=-1))


class UntiedLinear(nn.Module):
    """N independent linear maps, one per column: ``y[n] = x[n] @ W[n] + b[n]``.

    Shape: input (N, B, in_features) -> output (N, B, out_features).
    Weight is stored as (N, in, out) so the forward pass is one ``baddbmm``.
    """

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check(self, x: torch.Tensor) -> None:
        n = self.weight.shape[0]  # N, or the rows a functional call substitutes (chunked_backward: a range of columns)
        if x.shape[0] != n or x.shape[-1] != self.in_features:
            raise ValueError(
                f"UntiedLinear expects input (N={n}, B, {self.in_features}), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(_LOCAL, "session", None) is not None:
            return untied_linear_fused(x, [self])[0]
        self._check(x)
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # (N, B, out)

    def extra_repr(self) -> str:
        return f"n={self.n}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _ColumnLayerNorm(torch.autograd.Function):
    """``y = LayerNorm(x) * w[n] + b[n]`` on (N, B, C) with w, b (N, C), float32 math. Saves only the input (which
    the graph keeps anyway: the block's residual stream) and the (N, B) mean and 1/std; the normalised input is
    recomputed in backward instead of being stored: one (N, B, C) tensor less per norm and step. Low-precision
    inputs (autocast) are normalised in float32, as ``F.layer_norm`` does under autocast."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        xf = _at_least_fp32(x)
        xhat, mean, rstd = torch.native_layer_norm(xf, (xf.shape[-1],), None, None, eps)  # (N, B, C), (N, B, 1) x2
        ctx.save_for_backward(x, w, mean, rstd)
        return torch.addcmul(b.unsqueeze(1), xhat, w.unsqueeze(1))

    @staticmethod
    def backward(ctx, g):
        x, w, mean, rstd = ctx.saved_tensors
        xf = _at_least_fp32(x)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            xhat = (xf - mean).mul_(rstd)  # (N, B, C), recomputed
            gw = (g * xhat).sum(1).to(w.dtype)
            del xhat
        if ctx.needs_input_grad[2]:
            gb = g.sum(1).to(w.dtype)
        if ctx.needs_input_grad[0]:
            gxhat = g * w.unsqueeze(1)
            gx = torch.ops.aten.native_layer_norm_backward(
                gxhat, xf, (xf.shape[-1],), mean, rstd, None, None, [True, False, False]
            )[0].to(x.dtype)
        return gx, gw, gb, None


class _ColumnAffine(torch.autograd.Function):
    """``y = x * w[n] + b[n]`` on (N, B, C) with w, b (N, C): one fused pass forward, and a backward without
    the extra multiply-by-``value`` pass that ``torch.addcmul``'s generic backward spends."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.addcmul(b.unsqueeze(1), x, w.unsqueeze(1))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = (g * w.unsqueeze(1)).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = (g * x).sum(1).to(w.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(1).to(w.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _NativeColumnNorm(torch.autograd.Function):
    """:class:`_ColumnLayerNorm`'s math in the C++ kernel (float32/float64 on CPU): one pass over each column's rows
    forward (saving the input and the (N, B) statistics) and one backward (the normalised input recomputed)."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        y, mean, rstd = native.load().norm_forward(x, w, b, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = native.load().norm_backward(g.contiguous(), x, mean, rstd, w, need_x, need_w, need_b)
        return gx if need_x else None, gw if need_w else None, gb if need_b else None, None


class UntiedLayerNorm(nn.Module):
    """LayerNorm over channels with a separate affine (weight, bias) per column. (N, B, C) -> (N, B, C).

    ``recompute`` (set by a sheet with ``checkpoint=true``): store only the input and the (N, B) statistics and
    recompute the normalised input in backward (one (N, B, C) tensor less per use; 3-10 % slower steps on the
    tiny presets, so off by default). Same values and gradients either way. Where the C++ kernels apply
    (float32/float64 on CPU, :func:`native_kernels`) the norm always runs as one C++ pass that stores only the
    input and the statistics, whatever ``recompute`` says.
    """

    def __init__(self, n: int, dim: int, eps: float = 1e-5, recompute: bool = False):
        super().__init__()
        self.n, self.dim, self.eps, self.recompute = n, dim, eps, recompute
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]  # N, or the rows a functional call substitutes (chunked_backward)
        if x.shape[0] != n or x.shape[-1] != self.dim:
            raise ValueError(f"UntiedLayerNorm expects input (N={n}, B, {self.dim}), got {tuple(x.shape)}")
        if _native_for(x, self.weight, self.bias) is not None and x.dim() == 3:
            return _NativeColumnNorm.apply(x.contiguous(), self.weight, self.bias, self.eps)
        if self.recompute:
            return _ColumnLayerNorm.apply(x, self.weight, self.bias, self.eps)
        x = F.layer_norm(x, (self.dim,), eps=self.eps)  # (N, B, C)
        return _ColumnAffine.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}" + (", recompute=True" if self.recompute else "")


def per_column_parameters(module: nn.Module, biases: bool = True) -> list[nn.Parameter]:
    """The per-column parameters (N, ...) of every untied linear and layer norm inside ``module``, in module
    order: each one's weight, then (with ``biases``) its bias. Empty for tied modules."""
    out = []
    for m in module.modules():
        if isinstance(m, (UntiedLinear, UntiedLayerNorm)):
            out.append(m.weight)
            if biases and m.bias is not None:
                out.append(m.bias)
    return out


class TiedLinear(nn.Linear):
    """A standard linear layer shared by all columns, with the library's init."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def linear(n: int, in_features: int, out_features: int, untied, bias: bool = True) -> nn.Module:
    """A per-column (``untied=True``), shared (``False``) or mixture linear layer acting on (N, B, C).

    ``untied`` may also be a weight bank (``mixture.MixtureCoefficients``): the layer's per-column
    weights are then a mixture of the bank's experts.
    """
    if not isinstance(untied, bool):
        return untied.linear(in_features, out_features, bias)
    if untied:
        return UntiedLinear(n, in_features, out_features, bias=bias)
    return TiedLinear(in_features, out_features, bias=bias)


def layer_norm(n: int, dim: int, untied) -> nn.Module:
    """Per-column (True), shared (False) or mixture (a weight bank) LayerNorm affine."""
    if not isinstance(untied, bool):
        return untied.layer_norm(dim)
    return UntiedLayerNorm(n, dim) if untied else nn.LayerNorm(dim)


class Mlp(nn.Module):
    """Column computation: Linear -> GELU -> Linear, per column or shared. (N, B, C) -> (N, B, C).

    With untied layers inside an untied session where the C++ kernels apply, the second layer reads GELU of the
    first layer's output inside its kernel (forward and backward): one (N, B, hidden) tensor kept per use, not two.

    ``recompute`` (set by a sheet with ``checkpoint=true``): with untied layers inside an untied session, store only
    the input and recompute the hidden activations in backward (one more fc1 forward; per use one (N, B, hidden)
    tensor less with the C++ kernels, two with torch's ops). Same values and gradients either way.
    """

    def __init__(self, n: int, dim: int, hidden: int, untied, recompute: bool = False):
        super().__init__()
        self.fc1 = linear(n, dim, hidden, untied)
        self.fc2 = linear(n, hidden, dim, untied)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = getattr(_LOCAL, "session", None)
        if (self.recompute and session is not None and torch.is_grad_enabled()
                and isinstance(self.fc1, UntiedLinear) and isinstance(self.fc2, UntiedLinear)
                and self.fc1.bias is not None and self.fc2.bias is not None):
            self.fc1._check(x)
            w1, b1, stash1 = _tap([self.fc1], session, True)
            w2, b2, stash2 = _tap([self.fc2], session, True)
            return _RecomputedMlp.apply(x, w1, b1, w2, b2, stash1, stash2)
        h = self.fc1(x)  # (N, B, hidden)
        if session is not None and isinstance(self.fc2, UntiedLinear) and torch.is_grad_enabled():
            self.fc2._check(h)
            w2, b2, stash2 = _tap([self.fc2], session, self.fc2.bias is not None)
            if _native_for(h, w2, b2) is not None:  # fc2(GELU(h)) in one C++ pass per column, only h kept
                return _UntiedUse.apply(h, w2, b2, stash2, True)
        return self.fc2(F.gelu(h))
