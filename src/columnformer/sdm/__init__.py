"""Sparse Distributed Memory (SDM) theory, associative-memory experiments and the
effective beta of attention (after Bricken & Pehlevan, "Attention Approximates Sparse
Distributed Memory", NeurIPS 2021).

Submodules: :mod:`.theory` (exact SDM formulas), :mod:`.memories` (batched
associative memories), :mod:`.recall` (recall experiment), :mod:`.effective_beta`
(effective beta of attention heads) and :mod:`.cli` (``columnformer sdm ...``).
"""

from .theory import fit_beta, snr_optimal_probability

__all__ = ["fit_beta", "snr_optimal_probability"]
