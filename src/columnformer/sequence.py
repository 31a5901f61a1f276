"""Token front end and sequence read-out around a :class:`Columnformer` sheet.

    tokens (B, S) int                      S = len(input area): one token per input column
      -> TokenEmbed: embedding lookup      (B, S, C)       position: the sheet's per-column pos_embed
      -> Columnformer sheet                (B, n_out, C)
      -> SequenceHead: the first L output  (B, L, V)       one prediction per output position
         columns, LayerNorm, linear

The input area may be 1-D (a row of columns) or 2-D (a grid, tokens written row-major); the order of
the sheet's input area is the order of the sequence. Position information comes from the sheet's
learned per-column position embedding (``sheet.pos_embed``, on by default); untied columns also own
their weights, so a column knows its position through its parameters too.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import INIT_STD
from .sheet import Columnformer, Trace


class TokenEmbed(nn.Module):
    """Discrete tokens (B, S) in ``[0, vocab)`` -> embeddings (B, S, C)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        nn.init.trunc_normal_(self.weight, std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor (B, S), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"token ids must lie in [0, {self.vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.weight[tokens]  # (B, S, C)


class SequenceHead(nn.Module):
    """The first ``length`` output-area columns (B, n_out, C) -> logits (B, length, vocab).

    One linear read-out shared by every position, after a LayerNorm of each column.
    """

    def __init__(self, dim: int, length: int, vocab: int):
        super().__init__()
        self.length = length
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, vocab)
        nn.init.trunc_normal_(self.fc.weight, std=INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, n_out, C)
        return self.fc(self.norm(x[:, : self.length]))  # (B, length, vocab)


class SequenceColumnformer(nn.Module):
    """Token embedding -> Columnformer sheet -> sequence head. ``forward`` returns (logits, trace)."""

    def __init__(self, embed: TokenEmbed, sheet: Columnformer, head: SequenceHead):
        super().__init__()
        if len(sheet.output_idx) < head.length:
            raise ValueError(
                f"the read-out needs {head.length} output columns but the sheet's output area has "
                f"{len(sheet.output_idx)}; enlarge the output area (model.output_area=all, or a wider top layer)"
            )
        self.embed, self.sheet, self.head = embed, sheet, head

    def features(self, tokens: torch.Tensor, record=(), steps: int | None = None) -> tuple[torch.Tensor, Trace]:
        """The sheet's output area before the head: (B, n_out, C), and the trace."""
        if tokens.ndim != 2 or tokens.shape[1] != self.sheet.num_tokens:
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)} but the sheet's input area takes "
                f"{self.sheet.num_tokens} tokens per example: (B, {self.sheet.num_tokens})"
            )
        return self.sheet(self.embed(tokens), record=record, steps=steps)  # (B, n_out, C)

    def forward(self, tokens: torch.Tensor, record=(), steps: int | None = None) -> tuple[torch.Tensor, Trace]:
        features, trace = self.features(tokens, record, steps)
        return self.head(features), trace  # (B, L, V)
