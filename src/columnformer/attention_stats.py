"""What one attention call reports (shared by the dense, gather, fused, block-sparse and FlexAttention kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionStats:
    """Scalars always, the map only on request."""

    wiring: torch.Tensor  # scalar, differentiable: mean_{b,h,q} sum_k W[q,k] A[q,k]
    entropy: torch.Tensor  # scalar, detached: mean_{b,h,q} of -sum_k A log A
    attn: torch.Tensor | None = None  # (B, H, N, N) dense or (B, H, N, K) sparse
