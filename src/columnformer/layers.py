"""Per-column layers: every column of the sheet owns its parameters.

Activations use the column-major layout ``(N, B, C)`` so an untied linear layer is one
batched matmul (``baddbmm``) over the N columns, never a Python loop. The tied versions
(plain ``nn.Linear`` / ``nn.LayerNorm``) act on the same layout, so a block can mix them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.n or x.shape[-1] != self.in_features:
            raise ValueError(
                f"UntiedLinear expects input (N={self.n}, B, {self.in_features}), got {tuple(x.shape)}"
            )
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # (N, B, out)

    def extra_repr(self) -> str:
        return f"n={self.n}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class UntiedLayerNorm(nn.Module):
    """LayerNorm over channels with a separate affine (weight, bias) per column. (N, B, C) -> (N, B, C)."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.n, self.dim, self.eps = n, dim, eps
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(self.bias.unsqueeze(1), x, self.weight.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}"


class TiedLinear(nn.Linear):
    """A standard linear layer shared by all columns, with the library's init."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def linear(n: int, in_features: int, out_features: int, untied: bool, bias: bool = True) -> nn.Module:
    """A per-column (untied) or shared (tied) linear layer acting on (N, B, C)."""
    if untied:
        return UntiedLinear(n, in_features, out_features, bias=bias)
    return TiedLinear(in_features, out_features, bias=bias)


def layer_norm(n: int, dim: int, untied: bool) -> nn.Module:
    return UntiedLayerNorm(n, dim) if untied else nn.LayerNorm(dim)


class Mlp(nn.Module):
    """Column computation: Linear -> GELU -> Linear, per column or shared. (N, B, C) -> (N, B, C)."""

    def __init__(self, n: int, dim: int, hidden: int, untied: bool):
        super().__init__()
        self.fc1 = linear(n, dim, hidden, untied)
        self.fc2 = linear(n, hidden, dim, untied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
