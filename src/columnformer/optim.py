"""AdamW whose two moments are stored in bfloat16: half of AdamW's state memory, the same update.

For a wide sheet the optimizer state dominates memory: a column of the benchmark sheet owns 3,392 parameters,
and fp32 AdamW keeps 16 bytes per parameter (weight, gradient, two moments). :class:`AdamW` here stores the
moments in bf16 (2 bytes each) and performs every step in float32 exactly as ``torch.optim.AdamW`` does
(decoupled weight decay, bias correction, ``eps`` added to the corrected root): each parameter's moments are
read into float32, updated, used, and written back.

The write-back rounds *stochastically* (up with probability equal to the distance to the lower bf16 value),
so the stored moments are unbiased; round-to-nearest would freeze them whenever one step changes them by
less than half a bf16 ulp (0.2 %), e.g. the second moment with beta2 = 0.999 could then never decrease. The
noise comes from a generator seeded by (seed, step, parameter index): a resumed run rounds exactly as an
uninterrupted one. Large tensors are processed in chunks, so the float32 temporaries stay small.

Selected by ``optim.state_dtype=bf16`` (``train.py``); the default ``fp32`` uses ``torch.optim.AdamW`` (its fused kernel
on CPU and CUDA).
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # elements per float32 temporary


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 ``src`` into bf16 ``dst`` (same shape), rounding each value up or down at random with
    probabilities that make the result unbiased. ``src`` is overwritten."""
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, generator=generator, device=src.device)
    bits.add_(noise).bitwise_and_(-65536)  # add below the bf16 mantissa, then truncate (magnitude bits)
    dst.copy_(src)  # exact: src now holds bf16 values


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with both moments stored in bf16 (stochastically rounded); float32 math.

    Args:
        params: parameters or parameter groups (float32).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the bias-corrected root of the second moment.
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p`` before the Adam step).
        seed: seeds the rounding noise together with the step and the parameter's index.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: need lr > 0, eps > 0, weight_decay >= 0, 0 <= betas < 1; got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"AdamW with bf16 moments needs float32 parameters; got {p.dtype}")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        return state

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
                    raise RuntimeError("AdamW with bf16 moments does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                t = int(state["step"].item())
                if gen is None or gen.device != p.device:
                    gen = torch.Generator(device=p.device)
                gen.manual_seed((self.seed * 1_000_003 + t) * 1_000_033 + index)
                step_size = lr / (1 - beta1**t)
                bc2_sqrt = math.sqrt(1 - beta2**t)
                p.mul_(1 - lr * wd)
                flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
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

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype: undo that
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != torch.bfloat16:
                    state[key] = state[key].to(torch.bfloat16)  # exact: the values were bf16 when saved
