"""AdamW whose two moments are stored in bfloat16 or in 8 bits: the same update, 1/2 or ~1/4 of the state.

For a wide sheet the optimizer state dominates memory: a column of the benchmark sheet owns 3,392 parameters,
and fp32 AdamW keeps 16 bytes per parameter (weight, gradient, two moments). :class:`AdamW` here stores the
moments in less and performs every step in float32 exactly as ``torch.optim.AdamW`` does (decoupled weight
decay, bias correction, ``eps`` added to the corrected root): each parameter's moments are read into float32,
updated, used, and written back. Large tensors are processed in chunks, so the float32 temporaries stay small.

``state_dtype="bf16"`` (2 + 2 bytes per parameter): the write-back rounds *stochastically* (up with
probability equal to the distance to the lower bf16 value), so the stored moments are unbiased; round-to-nearest
would freeze them whenever one step changes them by less than half a bf16 ulp (0.2 %), e.g. the second moment
with beta2 = 0.999 could then never decrease. The noise is seeded by (seed, step, parameter index) -- a
counter-based hash in the C++ step (``csrc/optim_ops.cpp``, one pass per parameter, where the kernels build), torch's
generator in the chunked torch path -- so a resumed run rounds exactly as an uninterrupted one (the two paths draw
different noise).

``state_dtype="8bit"`` (1 + 1 bytes per parameter, plus two float32 scales per block of 256): block-wise
quantization as in 8-bit Adam (Dettmers et al., "8-bit optimizers via block-wise quantization", ICLR 2022), each
block scaled by its largest magnitude and rounded to nearest. The first moment is stored as float8 e4m3 values
(3 mantissa bits, 2^-9 to 448 of the scale: a dynamic-exponent code). The second is stored as its square root (the
quantity the update divides by) in a logarithmic code, 16 values per octave down to 2^-15.9 of the block's largest
(within 2.2 % after rounding; a smaller value is rounded up to the smallest code, never to 0, so no update is
divided by ``eps`` alone). On synthetic gradients (``benchmarks/moment_codes.py``: beta2 = 0.999, 2,000 steps,
magnitudes spread over decades) the sum of the updates deviates from float32 AdamW's by 9.2 % with this code for
the root against 13.8 % with e4m3 for it; the first moment's e4m3 alone gives 0.9 %. Rounding to nearest does not
freeze the moments: each step rescales every block to its new largest value, which dithers the rounding.
Deterministic, so a resumed run is exact. The step runs in C++ where the kernels build (``csrc/optim_ops.cpp``: one
vectorised pass per parameter, the same code tables), else in chunks of torch ops.

Selected by ``optim.state_dtype=bf16`` / ``8bit`` (``train.py``); the default ``fp32`` uses ``torch.optim.AdamW``
(its fused kernel on CPU and CUDA).
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # elements per float32 temporary (a multiple of BLOCK)
USE_NATIVE = True  # the C++ step where it builds (tests switch it off to compare the two paths)
BLOCK = 256  # 8-bit moments: elements per quantization block (one float32 scale each)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
STATE_DTYPES = ("bf16", "8bit")


def _native_for(p: torch.Tensor):
    """The C++ kernels for a contiguous float32 CPU parameter (None: the torch path)."""
    if not USE_NATIVE or p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
        return None
    from . import native

    return native.load()


def quantize_fp8_(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> None:
    """Block-wise 8-bit float quantization: write float32 ``x`` (length a multiple of :data:`BLOCK`) into ``codes``
    (uint8, same length: the bits of float8 e4m3fn values) and ``scales`` (float32, one per block), each block
    scaled so that its largest magnitude becomes 448, rounded to nearest. ``x`` is overwritten."""
    xb = x.view(-1, BLOCK)  # (blocks, BLOCK)
    amax = xb.abs().amax(1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (blocks,); an all-zero block stays 0
    xb.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    codes.view(FP8).copy_(x)
    scales.copy_(scale)


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 values of :func:`quantize_fp8_`'s ``codes`` and ``scales`` (a new tensor of the codes' length)."""
    return codes.view(FP8).float().view(-1, BLOCK).mul_(scales[:, None]).view(-1)


ROOT_STEPS = 16  # 8-bit root code: values per octave (2^(1/16): 4.4 % apart, within 2.2 % after rounding)
# code c >= 1 stands for 2^((c - 255) / 16) of the block's scale, 0 for 0; a value is rounded to the nearest code in
# the logarithm, i.e. counted against the 254 midpoints 2^((c - 254.5) / 16) between codes c and c + 1
ROOT_TABLE = torch.tensor([0.0] + [2.0 ** ((c - 255) / ROOT_STEPS) for c in range(1, 256)], dtype=torch.float32)
ROOT_BOUNDS = torch.tensor([2.0 ** ((c - 254.5) / ROOT_STEPS) for c in range(1, 255)], dtype=torch.float32)
FP8_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()  # the 256 e4m3fn values


def quantize_root_(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> None:
    """Block-wise 8-bit logarithmic code of non-negative float32 ``x`` (length a multiple of :data:`BLOCK`): code 0
    is 0, code c >= 1 is ``scale * 2^((c - 255) / 16)`` with the block's largest value as its scale, rounded to
    nearest in the logarithm; a value below the code's range (2^-15.9 of the block's largest) is rounded up to the
    smallest code, never to 0. ``x`` is overwritten."""
    xb = x.view(-1, BLOCK)  # (blocks, BLOCK)
    amax = xb.amax(1)
    scales.copy_(amax)
    xb.div_(amax.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    c = torch.bucketize(x, ROOT_BOUNDS.to(x.device), right=True).add_(1).masked_fill_(x <= 0, 0)
    codes.copy_(c)


def dequantize_root(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 values of :func:`quantize_root_`'s ``codes`` and ``scales`` (a new tensor of the codes' length)."""
    x = ROOT_TABLE.to(codes.device)[codes.long()].view(-1, BLOCK).mul_(scales[:, None])
    return x.view(-1)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 ``src`` into bf16 ``dst`` (same shape), rounding each value up or down at random with
    probabilities that make the result unbiased. ``src`` is overwritten."""
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, generator=generator, device=src.device)
    bits.add_(noise).bitwise_and_(-65536)  # add below the bf16 mantissa, then truncate (magnitude bits)
    dst.copy_(src)  # exact: src now holds bf16 values


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with both moments stored in bf16 or in 8 bits; float32 math.

    Args:
        params: parameters or parameter groups (float32).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the bias-corrected root of the second moment.
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p`` before the Adam step).
        seed: seeds bf16's rounding noise together with the step and the parameter's index.
        state_dtype: ``"bf16"`` (stochastically rounded) or ``"8bit"`` (block-wise: e4m3 first moment, the second
            moment's root in a logarithmic code; see the module docstring).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, state_dtype: str = "bf16"):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: need lr > 0, eps > 0, weight_decay >= 0, 0 <= betas < 1; got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"AdamW: state_dtype={state_dtype!r}; choose one of {STATE_DTYPES}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        self.state_dtype = state_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"AdamW with {state_dtype} moments needs float32 parameters; got {p.dtype}")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if self.state_dtype == "bf16":
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            else:  # 8bit: flat, padded to whole blocks; zero codes are 0.0
                blocks = -(-p.numel() // BLOCK)
                for key in ("exp_avg", "exp_avg_sq_root"):
                    state[key] = torch.zeros(blocks * BLOCK, dtype=torch.uint8, device=p.device)
                    state[key + "_scale"] = torch.ones(blocks, dtype=torch.float32, device=p.device)
        return state

    def _noise_seed(self, step: int, index: int) -> int:
        """Seed of bf16's rounding noise for parameter ``index`` (counted from 1) at ``step``: the same in a whole
        step and in its parts (:func:`step_part`), on every rank and after a resume."""
        return ((self.seed * 1_000_003 + step) * 1_000_033 + index) % (1 << 63)

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (exp_avg, exp_avg_sq) of parameter ``p`` in float32 and p's shape (None before its first step):
        what the next step starts from."""
        state = self.state.get(p)
        if not state:
            return None
        if self.state_dtype == "bf16":
            return state["exp_avg"].float(), state["exp_avg_sq"].float()
        n = p.numel()
        m = dequantize_fp8(state["exp_avg"], state["exp_avg_scale"])[:n].view_as(p)
        root = dequantize_root(state["exp_avg_sq_root"], state["exp_avg_sq_root_scale"])[:n].view_as(p)
        return m, root.square()

    @torch.no_grad()
    def zero_moments_(self, p: torch.Tensor, where: torch.Tensor) -> None:
        """Zero both moments of the entries of parameter ``p`` selected by the boolean ``where`` (p's shape), e.g.
        of rewired edges; 8-bit blocks holding them are quantized again (their scale may shrink)."""
        state = self.state.get(p)
        if not state:
            return
        if self.state_dtype == "bf16":
            state["exp_avg"][where] = 0
            state["exp_avg_sq"][where] = 0
            return
        n = p.numel()
        flat = where.reshape(-1).to(p.device)
        for key, dequantize, quantize_ in (("exp_avg", dequantize_fp8, quantize_fp8_),
                                           ("exp_avg_sq_root", dequantize_root, quantize_root_)):
            x = dequantize(state[key], state[key + "_scale"])
            x[:n][flat] = 0
            quantize_(state[key], state[key + "_scale"], x)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gen = None
        index = 0
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"AdamW with {self.state_dtype} moments does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                t = int(state["step"].item())
                step_size = lr / (1 - beta1**t)
                bc2_sqrt = math.sqrt(1 - beta2**t)
                flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
                seed = self._noise_seed(t, index)
                ext = _native_for(p)
                if ext is not None and self.state_dtype == "8bit":  # one pass in C++ (csrc/optim_ops.cpp)
                    ext.adamw_8bit_step(flat_p, flat_g.contiguous(), state["exp_avg"], state["exp_avg_scale"],
                                        state["exp_avg_sq_root"], state["exp_avg_sq_root_scale"], FP8_TABLE,
                                        ROOT_TABLE, ROOT_BOUNDS, beta1, beta2, eps, step_size, bc2_sqrt, 1 - lr * wd)
                    continue
                if ext is not None and state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous():
                    ext.adamw_bf16_step(flat_p, flat_g.contiguous(), state["exp_avg"], state["exp_avg_sq"], beta1,
                                        beta2, eps, step_size, bc2_sqrt, 1 - lr * wd, seed, 0)
                    continue
                p.mul_(1 - lr * wd)
                if self.state_dtype == "8bit":
                    self._step_8bit(state, flat_p, flat_g, beta1, beta2, eps, step_size, bc2_sqrt)
                    continue
                if gen is None or gen.device != p.device:
                    gen = torch.Generator(device=p.device)
                gen.manual_seed(seed)
                flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for s in range(0, flat_p.numel(), CHUNK):
                    sl = slice(s, s + CHUNK)
                    g = flat_g[sl].float()
                    m = flat_m[sl].float().lerp_(g, 1 - beta1)  # (chunk,) float32
                    v = flat_v[sl].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / bc2_sqrt).add_(eps)
                    flat_p[sl].addcdiv_(m, denom, value=-step_size)
                    stochastic_round_(flat_m[sl], m, gen)
                    stochastic_round_(flat_v[sl], v, gen)
        return loss

    @staticmethod
    def _step_8bit(state: dict, flat_p, flat_g, beta1, beta2, eps, step_size, bc2_sqrt, start: int = 0) -> None:
        """One AdamW step of one parameter with block-wise 8-bit moments, chunk by chunk (chunks are whole blocks).
        ``start``: flat_p and flat_g are the parameter's elements from ``start`` on (a multiple of BLOCK)."""
        first = start // BLOCK
        codes_m, scales_m = state["exp_avg"][start:], state["exp_avg_scale"][first:]
        codes_r, scales_r = state["exp_avg_sq_root"][start:], state["exp_avg_sq_root_scale"][first:]
        n = flat_p.numel()
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            padded = -(-(e - s) // BLOCK) * BLOCK  # the chunk's length in whole blocks
            cs, bs = slice(s, s + padded), slice(s // BLOCK, (s + padded) // BLOCK)
            if padded == e - s:
                g = flat_g[s:e].float()
            else:  # the parameter's last, partial block: zero gradient in the padding keeps its moments 0
                g = flat_g.new_zeros(padded, dtype=torch.float32)
                g[: e - s] = flat_g[s:e]
            m = dequantize_fp8(codes_m[cs], scales_m[bs]).lerp_(g, 1 - beta1)  # (padded,) float32
            root = dequantize_root(codes_r[cs], scales_r[bs])
            root.square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()  # sqrt(new exp_avg_sq)
            denom = (root / bc2_sqrt).add_(eps)
            flat_p[s:e].addcdiv_(m[: e - s], denom[: e - s], value=-step_size)
            quantize_fp8_(codes_m[cs], scales_m[bs], m)
            quantize_root_(codes_r[cs], scales_r[bs], root)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts all state but the step to the parameter's float32: undo that
        wanted = {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16} if self.state_dtype == "bf16" else \
            {"exp_avg": torch.uint8, "exp_avg_sq_root": torch.uint8}
        for state in self.state.values():
            if "exp_avg" in state and ("exp_avg_sq" in state) != (self.state_dtype == "bf16"):
                raise ValueError(f"this optimizer state holds moments of another state_dtype than {self.state_dtype!r}; "
                                 "resume with the optim.state_dtype the run started with")
            for key, dtype in wanted.items():
                if key in state and state[key].dtype != dtype:
                    state[key] = state[key].to(dtype)  # exact: the values were of that dtype when saved


# ---------------------------------------------------------------------- steps on part of a parameter
def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[dict, int]:
    """The parameter group holding ``p`` and p's index among all parameters, counted from 1 (as :meth:`AdamW.step`)."""
    index = 0
    for group in optimizer.param_groups:
        for q in group["params"]:
            index += 1
            if q is p:
                return group, index
    raise ValueError("this parameter is not in the optimizer's parameter groups")


def _native_available() -> bool:
    from . import native

    return native.load() is not None


def check_partial(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose step cannot be split into :func:`step_part` calls, naming what to change."""
    if isinstance(optimizer, AdamW):
        if optimizer.state_dtype == "bf16" and not (USE_NATIVE and _native_available()):
            raise ValueError(
                "a step in parts (train.chunked_backward) with optim.state_dtype=bf16 needs the C++ kernels (their "
                "rounding noise is counted per element of the whole parameter), which are not available here; use "
                "optim.state_dtype fp32 or 8bit"
            )
        return
    if type(optimizer) is not torch.optim.AdamW:
        raise ValueError(f"a step in parts (train.chunked_backward) needs AdamW, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            raise ValueError("a step in parts (train.chunked_backward) supports AdamW without amsgrad, maximize, "
                             "capturable or differentiable")
        if any(p.dtype not in (torch.float32, torch.float64) for p in group["params"]):
            raise ValueError("a step in parts (train.chunked_backward) needs float32 (or float64) parameters")


@torch.no_grad()
def begin_parts(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """Count one more step for ``p``, whose elements :func:`step_part` will then update part by part; the next
    ``optimizer.step()`` must find no gradient on ``p`` (it would step p again). Creates p's state if it has none."""
    if isinstance(optimizer, AdamW):
        optimizer._state(p)["step"] += 1
        return
    state = optimizer.state[p]
    if not state:  # torch.optim.AdamW(fused=True)'s layout of a fresh state
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1


@torch.no_grad()
def step_part(optimizer: torch.optim.Optimizer, p: torch.Tensor, start: int, grad: torch.Tensor,
              target: torch.Tensor) -> None:
    """The AdamW step of the flat elements ``[start, start + grad.numel())`` of parameter ``p`` (after
    :func:`begin_parts`): their moments are updated in place and their new values written into ``target`` (float32,
    ``grad.numel()`` elements holding their current values: a view of p, or a copy to write back later). AdamW is
    elementwise (8-bit: block by block; bf16: noise counted per element of the whole parameter, C++ kernels only), so
    the parts of a parameter give exactly its whole step; 8-bit parts start on a block boundary (a multiple of 256
    elements)."""
    n = grad.numel()
    flat_t, flat_g = target.view(-1), grad.reshape(-1)
    group, index = _group_of(optimizer, p)
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    state = optimizer.state[p]
    if not isinstance(optimizer, AdamW):  # torch's fused AdamW kernel on the part's views: the same arithmetic
        sl = slice(start, start + n)
        torch._fused_adamw_([flat_t], [flat_g.contiguous()], [state["exp_avg"].view(-1)[sl]],
                            [state["exp_avg_sq"].view(-1)[sl]], [], [state["step"]], lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
        return
    t = int(state["step"].item())
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = math.sqrt(1 - beta2**t)
    ext = _native_for(target)
    if optimizer.state_dtype == "bf16":  # the C++ step, its noise counted from the part's first element
        if ext is None:
            raise RuntimeError("a bf16 step in parts needs the C++ kernels (float32 CPU parameters)")
        seed = optimizer._noise_seed(t, index)
        sl = slice(start, start + n)
        ext.adamw_bf16_step(flat_t, flat_g.contiguous().float(), state["exp_avg"].view(-1)[sl],
                            state["exp_avg_sq"].view(-1)[sl], beta1, beta2, eps, step_size, bc2_sqrt, 1 - lr * wd,
                            seed, start)
        return
    if start % BLOCK or (start + n != p.numel() and n % BLOCK):
        raise ValueError(f"an 8-bit step part must cover whole blocks of {BLOCK}: start {start}, length {n}")
    if ext is not None:
        padded = -(-n // BLOCK) * BLOCK
        cs, bs = slice(start, start + padded), slice(start // BLOCK, (start + padded) // BLOCK)
        ext.adamw_8bit_step(flat_t, flat_g.contiguous().float(), state["exp_avg"][cs], state["exp_avg_scale"][bs],
                            state["exp_avg_sq_root"][cs], state["exp_avg_sq_root_scale"][bs], FP8_TABLE, ROOT_TABLE,
                            ROOT_BOUNDS, beta1, beta2, eps, step_size, bc2_sqrt, 1 - lr * wd)
        return
    flat_t.mul_(1 - lr * wd)
    AdamW._step_8bit(state, flat_t, flat_g, beta1, beta2, eps, step_size, bc2_sqrt, start)
