"""The sheet: N columns in a geometry, each an attention + MLP block, unrolled over steps.

    x_0          = zeros; input tokens written into the input area (+ position embedding)
    x_{t+1}      = Block(x_t)                      recurrent: the same block every step
                 = Block_t(x_t)                    feed-forward: a distinct block per step
    Block(x)     = y + MLP(norm2(y)),   y = x + Attn(norm1(x))   (or y = Attn(...) without residual)
    output       = x_T at the output area
                 = sum_t w_t x_t                   with halting (ACT / PonderNet): per-column weights w_t

Halting (``halting: act | ponder``, recurrent sheets). Every column owns a halting unit
``lambda_t = sigmoid(h(x_t))`` read after each step. The loop always runs ``steps`` steps (static
shapes, no data-dependent control flow); a column that has halted keeps its state (the block's
update is masked out) and its weights w_t after halting are 0.

    act     (Graves 2016; Universal Transformers): p_t = lambda_t; the column halts at the first step N
            where sum_{t<=N} p_t >= 1 - eps (or at the last step); w_t = p_t before N, w_N = R = 1 - sum_{t<N} p_t.
            Ponder cost rho = N + R per column; the loss adds ponder_weight * mean(rho).
    ponder  (PonderNet, Banino et al. 2021): p_t = lambda_t prod_{s<t} (1 - lambda_s), truncated the same
            way (the remaining mass goes to the halting step); the loss adds ponder_weight * KL(w || geometric
            prior with parameter ponder_prior, truncated to the steps and renormalised). PonderNet's expected
            loss over halting steps is taken per sheet output; with one halting distribution per column the
            output is the per-column expectation of the state, sum_t w_t x_t, as in ACT.

Activations are kept column-major, (N, B, C), so untied layers are one batched matmul.
``Columnformer.forward`` returns ``(output, Trace)``: per-step wiring cost and attention entropy
always, attention maps / column features / queries and keys only when ``record`` asks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np
import torch
import torch.utils.checkpoint
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .attention import AttentionStats, ColumnAttention, local_bias_init
from .block_sparse import BlockPlan, build_block_plan
from .flex_sparse import FlexPlan, build_flex_plan, runs_on as flex_runs_on
from .fused_sparse import FusedPlan, available as fused_available, build_fused_plan
from .connectivity import Connectivity
from .geometry import Geometry
from .layers import (
    INIT_STD, Mlp, UntiedLayerNorm, current_session, layer_norm, linear, reuse_session, untied_session,
)
from .mixture import MixtureCoefficients

RECORDABLE = ("attn", "features", "qk", "states")
_LEARNED_MAX_N = 4096  # learned positions form (N, N) distance matrices every forward


class SheetConfig(BaseModel):
    """Options of the column sheet. Every field is typed and validated."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(64, ge=1, description="column width C (channels per column)")
    steps: int = Field(4, ge=1, description="T: recurrent unroll steps, or number of blocks when feed-forward")
    recurrent: bool = Field(True, description="one sheet unrolled T steps (True) or T distinct sheets (False)")
    heads: int = Field(1, ge=1, description="attention heads")
    qk_dim: int = Field(16, ge=1, description="query/key dimension per head")
    value_proj: bool = Field(False, description="learn value/output projections (False: value = column input)")
    mlp_ratio: float = Field(1.0, gt=0, description="MLP hidden size = int(width * mlp_ratio); < 1 allowed")
    untied_attn: bool = Field(True, description="every column owns its attention weights")
    untied_mlp: bool = Field(True, description="every column owns its MLP weights")
    untied_norm: bool = Field(True, description="every column owns its LayerNorm affine")
    attn_mode: Literal["attention", "static_mix", "selection", "linmixing"] = Field(
        "attention", description="communication between columns: attention (data-dependent queries and keys), "
        "static_mix (softmax of the learned per-edge weights), selection (learned static query per column, "
        "data-dependent keys) or linmixing (the per-edge weights as linear weights, no softmax); see attention.py",
    )
    attn_head_bias: bool = Field(
        False, description="linmixing: a per-head weight added to the per-edge weight (the predecessor's head_bias)"
    )
    attn_bias: Literal["local", "zero", "none"] = Field(
        "local", description="learned per-edge bias: initialised clamp(-d^2/2sigma^2, min), zeros, or absent"
    )
    bias_sigma: float = Field(2.0, gt=0, description="sigma of the local bias initialisation")
    bias_min: float = Field(-8.0, le=0, description="floor of the local bias initialisation")
    pos_embed: bool = Field(True, description="learned position embedding per column")
    time_embed: bool = Field(False, description="learned embedding per step (recurrent only)")
    attn_residual: bool = Field(True, description="residual connection around attention")
    inject: Literal["first", "every"] = Field("first", description="write input tokens at the first step or every step")
    wiring_p: float = Field(1.0, gt=0, description="wiring weight W = D^p / mean(D^p)")
    checkpoint: bool = Field(
        False, description="activation checkpointing: keep only each step's input and recompute the step in backward "
        "(activation memory of one step instead of T; about one more forward pass of compute); per-column layer norms "
        "then also recompute their normalised input, and untied MLPs their hidden activations, in backward instead of "
        "storing them",
    )
    halting: Literal["none", "act", "ponder"] = Field(
        "none", description="adaptive computation per column (recurrent sheets): ACT or PonderNet halting; see the "
        "module docstring",
    )
    halt_eps: float = Field(0.01, gt=0, lt=1, description="a column halts when its halting probability reaches 1 - eps")
    ponder_weight: float = Field(
        0.01, ge=0, description="weight of the ponder cost (act: tau, on N + R) or of the KL to the prior (ponder: beta)"
    )
    ponder_prior: float = Field(0.3, gt=0, le=1, description="ponder: parameter of the geometric prior over halting steps")
    halt_bias: float = Field(
        1.0, description="initial bias of the halting units (Universal Transformers: 1.0, p = 0.73 at the first step)"
    )
    mixture: Literal["none", "static", "topo", "dynamic"] = Field(
        "none", description="weight banks: the parts in mixture_parts take per-column mixtures of `experts` shared "
        "weights, with static, topographic (smooth on the sheet) or input-dependent coefficients (see mixture.py)",
    )
    experts: int | list[int] = Field(
        4, description="mixture: experts E per weight bank (one bank per block); a list gives each feed-forward "
        "block its own E (the predecessor's per-block num_experts); a block with E = 1 is tied",
    )
    mixture_parts: list[Literal["attn", "mlp", "norm"]] = Field(
        default_factory=lambda: ["attn", "mlp", "norm"],
        description="mixture: the parts whose weights are mixtures; their untied_* flags are not consulted",
    )
    mixture_top_k: int | None = Field(None, ge=1, description="mixture=dynamic: mix only the top-k experts")
    mixture_conserve: bool = Field(
        False, description="mixture: divide the MLP hidden size by `experts` (the predecessor's mlp_conserve)"
    )
    learn_positions: bool = Field(
        False, description="column coordinates are parameters (euclidean geometries, N <= 4096): the wiring weights "
        "D^p / mean(D^p) follow them (mean over the current positions); optim.position_lr sets their learning rate",
    )
    position_repulsion: float = Field(
        1.0, ge=0, description="learn_positions: weight of the repulsion term sum_{i != j} relu(1 - d_ij / s0)^2 / N "
        "(s0: the initial minimum spacing), which keeps columns from collapsing onto each other",
    )
    position_constraint: Literal["none", "fixed_spread"] = Field(
        "none", description="learn_positions: fixed_spread rescales the positions about their centroid after every "
        "optimizer step so their RMS spread stays the initial one (a fixed-area constraint: columns sent far away to "
        "inflate mean(D), which lowers every other wiring weight, compress the rest below the initial spacing, and "
        "the repulsion then pushes back)",
    )
    sparse_kernel: Literal["auto", "gather", "block", "flex", "fused"] = Field(
        "auto", description="kernel for a sparse connectivity: block-sparse tiles (block), per-edge gather (gather), "
        "the per-edge math as one compiled C++ pass per column (fused: CPU only, built on first use, needs g++); auto: "
        "fused on CPU when it builds, else whichever of block and gather the block plan's cost model estimates cheaper; "
        "flex: the tiles as a FlexAttention block mask on CUDA (untimed: no GPU was available to measure it), the block "
        "kernel on CPU (torch's FlexAttention has no CPU backward); same math",
    )

    @model_validator(mode="after")
    def _check(self) -> "SheetConfig":
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.time_embed and not self.recurrent:
            raise ValueError("time_embed=True needs recurrent=True (feed-forward blocks are already distinct per step)")
        if self.attn_mode in ("static_mix", "linmixing") and self.attn_bias == "none":
            raise ValueError(
                f"attn_mode={self.attn_mode} weighs the edges by the learned per-edge bias; set attn_bias to local or zero"
            )
        if self.halting != "none" and not self.recurrent:
            raise ValueError(
                f"halting={self.halting} needs recurrent=True (a feed-forward sheet has one block per step: its depth "
                "is fixed)"
            )
        for switch, off, options in (
            ("halting", "none", ("halt_eps", "ponder_weight", "ponder_prior", "halt_bias")),
            ("mixture", "none", ("experts", "mixture_parts")),
        ):  # an option of a feature that is off would be silently ignored: refuse it
            if getattr(self, switch) == off:
                changed = [f for f in options if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)]
                if changed:
                    raise ValueError(
                        f"{', '.join(changed)} apply only when {switch} is on, but {switch}={off}: set {switch} "
                        f"(e.g. {'act' if switch == 'halting' else 'static'}) or leave {', '.join(changed)} at the default"
                    )
        if (self.position_repulsion != 1.0 or self.position_constraint != "none") and not self.learn_positions:
            raise ValueError(
                "position_repulsion / position_constraint apply when learn_positions=true; set learn_positions or "
                "leave them at their defaults"
            )
        if self.sparse_kernel == "flex" and self.checkpoint:
            raise ValueError(
                "sparse_kernel=flex with checkpoint=true is refused: under activation checkpointing torch 2.13's "
                "FlexAttention reference returns wrong gradients for a learned score_mod bias (checked on CPU; no GPU was "
                "available to check the CUDA kernel); use sparse_kernel=block with checkpoint=true, or flex without it"
            )
        if self.learn_positions and self.sparse_kernel in ("block", "flex"):
            raise ValueError(
                f"learn_positions=true needs a per-edge kernel (tiles are built from fixed coordinates), but "
                f"sparse_kernel={self.sparse_kernel}: set sparse_kernel to 'gather', 'fused' or 'auto'"
            )
        if self.attn_head_bias and self.attn_mode != "linmixing":
            raise ValueError(f"attn_head_bias=true applies to attn_mode=linmixing (got {self.attn_mode})")
        blocks = 1 if self.recurrent else self.steps
        if isinstance(self.experts, list) and len(self.experts) != blocks:
            raise ValueError(
                f"experts lists one E per block: {len(self.experts)} given, the sheet has {blocks} block(s) "
                f"({'recurrent' if self.recurrent else 'feed-forward, one per step'})"
            )
        if min(self.block_experts(i) for i in range(blocks)) < 1:
            raise ValueError(f"experts must be >= 1 (got {self.experts})")
        if self.mixture != "none":
            if not self.mixture_parts:
                raise ValueError("mixture needs at least one entry in mixture_parts (attn, mlp, norm)")
            if self.mixture_top_k is not None and (
                self.mixture != "dynamic" or self.mixture_top_k > min(self.block_experts(i) for i in range(blocks))
            ):
                raise ValueError(
                    f"mixture_top_k={self.mixture_top_k} needs mixture=dynamic and at most experts={self.experts}"
                )
        elif self.mixture_top_k is not None or self.mixture_conserve:
            raise ValueError("mixture_top_k / mixture_conserve apply to a mixture: set mixture to static, topo or dynamic")
        if min(self.mlp_hidden(i) for i in range(blocks)) < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives an empty MLP for width={self.width}")
        return self

    def block_experts(self, block: int) -> int:
        """Experts E of block ``block``'s weight bank."""
        return self.experts[block] if isinstance(self.experts, list) else self.experts

    def mlp_hidden(self, block: int = 0) -> int:
        """MLP hidden size of a block: int(width * mlp_ratio), divided by its E with mixture_conserve (E > 1)."""
        e = self.block_experts(block)
        conserve = self.mixture != "none" and self.mixture_conserve and "mlp" in self.mixture_parts and e > 1
        return int(self.width * (self.mlp_ratio / e if conserve else self.mlp_ratio))


@dataclass
class Trace:
    """What happened inside the sheet, per step.

    ``wiring`` and ``entropy`` are lists of T scalars (the wiring cost is differentiable and
    un-scaled by lambda). ``attn`` (B, H, N, N|K), ``features`` (B, N, C) and ``qk`` ((B, H, N, d) pairs)
    are filled only when requested through ``record``; so is ``states``, the state (N, B, C) after each
    step *with* its graph (for penalties on activity, see regularizers.py; references, no copies).

    With weight banks (``mixture``): per step ``expert_load`` (E,) the mean mixing coefficient of each
    expert and ``mix_entropy`` the mean entropy of the columns' coefficients (detached).

    With learned positions: ``repulsion`` the differentiable repulsion term (see ``SheetConfig.position_repulsion``).

    With halting: ``halt_weights`` (T, B, N) the weight of each step's state in the output (sums to 1
    over steps), ``halt_steps`` (B, N) the steps each column ran before it halted, ``ponder`` the
    differentiable ponder term (act: mean of N + R; ponder: mean KL to the prior) and ``aux_loss``
    ``ponder_weight * ponder``, which the trainer adds to the loss.
    """

    wiring: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    attn: list[torch.Tensor] | None = None
    features: list[torch.Tensor] | None = None
    qk: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    states: list[torch.Tensor] | None = None
    expert_load: list[torch.Tensor] | None = None
    mix_entropy: list[torch.Tensor] | None = None
    halt_weights: torch.Tensor | None = None
    halt_steps: torch.Tensor | None = None
    ponder: torch.Tensor | None = None
    ponder_weight: float = 0.0
    repulsion: torch.Tensor | None = None
    repulsion_weight: float = 0.0

    @property
    def aux_loss(self) -> torch.Tensor | float:
        """Regularisers the sheet asks the trainer to add to the loss (already weighted): the ponder term and,
        with learned positions, the repulsion between columns."""
        ponder = 0.0 if self.ponder is None else self.ponder_weight * self.ponder
        return ponder if self.repulsion is None else ponder + self.repulsion_weight * self.repulsion

    @property
    def wiring_cost(self) -> torch.Tensor:
        """Mean over steps of the per-step wiring cost (multiply by lambda for the loss)."""
        return torch.stack(self.wiring).mean()

    @property
    def attn_entropy(self) -> torch.Tensor:
        return torch.stack(self.entropy).mean()


class ColumnBlock(nn.Module):
    """One sheet: per-column norm -> attention (communication) -> norm -> MLP (computation)."""

    def __init__(self, cfg: SheetConfig, connectivity: Connectivity, coords: np.ndarray | None = None, index: int = 0):
        super().__init__()
        n, c = connectivity.n, cfg.width
        self.attn_residual = cfg.attn_residual
        # weight sharing per part: untied (True), tied (False) or this block's weight bank (E = 1: tied)
        self.coef = None
        share = {"attn": cfg.untied_attn, "mlp": cfg.untied_mlp, "norm": cfg.untied_norm}
        experts = cfg.block_experts(index)
        if cfg.mixture != "none":
            if experts > 1:
                self.coef = MixtureCoefficients(n, c, experts, cfg.mixture, coords, cfg.mixture_top_k)
            share.update({part: self.coef if experts > 1 else False for part in cfg.mixture_parts})
        self.norm1 = layer_norm(n, c, share["norm"])
        edge_shape = None if cfg.attn_bias == "none" else tuple(connectivity.dist.shape)
        self.attn = ColumnAttention(
            n, c, cfg.heads, cfg.qk_dim, cfg.value_proj, share["attn"], edge_shape, mode=cfg.attn_mode,
            head_bias=cfg.attn_head_bias,
        )
        self.norm2 = layer_norm(n, c, share["norm"])
        self.mlp = Mlp(n, c, cfg.mlp_hidden(index), share["mlp"])

    def forward(
        self,
        x: torch.Tensor,
        wiring_weight: torch.Tensor,
        edge_index: torch.Tensor | None,
        edge_mask: torch.Tensor | None,
        record: frozenset,
        plan: BlockPlan | FlexPlan | FusedPlan | None = None,
    ) -> tuple[torch.Tensor, AttentionStats, tuple | None]:
        if self.coef is not None:
            self.coef.update(x)  # this step's mixing coefficients (dynamic: from the block's input)
        a, stats, qk = self.attn(
            self.norm1(x), wiring_weight, edge_index, edge_mask, "attn" in record, "qk" in record, plan
        )
        x = x + a if self.attn_residual else a  # (N, B, C)
        x = x + self.mlp(self.norm2(x))
        return x, stats, qk


def _area(geometry: Geometry, area: Iterable[int] | str, name: str) -> np.ndarray:
    if isinstance(area, str):
        if area == "all":
            return np.arange(geometry.n)
        if area == "bottom":
            return geometry.layer_indices(0)
        if area == "top":
            return geometry.layer_indices(-1)
        raise ValueError(f"{name} must be 'all', 'bottom', 'top' or a list of column indices, got {area!r}")
    idx = np.asarray(list(area), dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= geometry.n or len(np.unique(idx)) != idx.size:
        raise ValueError(f"{name} must list distinct column indices in [0, {geometry.n}), got {idx.tolist()[:8]}...")
    return idx


def _input_tokens(tokens: Iterable[int] | None, n_in: int) -> torch.Tensor:
    if tokens is None:
        return torch.arange(n_in)
    tok = np.asarray(list(tokens), dtype=np.int64)
    if tok.shape != (n_in,) or tok.min() < 0 or len(np.unique(tok)) != tok.max() + 1:
        raise ValueError(
            f"input_tokens must give each of the {n_in} input-area columns a token index, using every index "
            f"0..T-1 (got {tok.size} entries)"
        )
    return torch.from_numpy(tok)


class Columnformer(nn.Module):
    """A sheet of columns in ``geometry``, attention restricted to ``connectivity``.

    Args:
        cfg: sheet options (:class:`SheetConfig`).
        geometry: where the columns sit (supplies distances and the wiring normaliser).
        connectivity: which columns each column reads; default all pairs.
        input_area: columns where input tokens enter: ``"bottom"`` (layer 0; the whole sheet for a
            single-layer geometry), ``"all"``, or explicit indices.
        output_area: columns read by task heads: ``"top"`` (last layer), ``"all"`` or indices.
        input_tokens: for each input-area column, the index of the token written into it (several
            columns may share a token: a retinotopic map); default one token per column, in order.

    Shape: tokens (B, n_tokens, C) -> output (B, n_out, C); n_tokens = len(input area) unless ``input_tokens``
    maps several columns to one token.
    """

    def __init__(
        self,
        cfg: SheetConfig,
        geometry: Geometry,
        connectivity: Connectivity | None = None,
        input_area: Iterable[int] | str = "bottom",
        output_area: Iterable[int] | str = "top",
        input_tokens: Iterable[int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.geometry = geometry
        self.connectivity = connectivity or Connectivity.dense(geometry)
        if self.connectivity.n != geometry.n:
            raise ValueError(f"connectivity has {self.connectivity.n} columns but the geometry has {geometry.n}")
        if self.connectivity.is_dense and cfg.sparse_kernel != "auto":
            raise ValueError(
                f"sparse_kernel={cfg.sparse_kernel!r} needs a sparse connectivity (local / local_long_range); "
                "a dense sheet always runs the dense kernel: leave sparse_kernel at 'auto'"
            )
        self._plan: BlockPlan | FlexPlan | FusedPlan | None = None  # built on first use, rebuilt when the edge buffers change
        self._step_runner = None  # run_steps_with: runs every step in place of the block (chunked_backward)
        n, c = geometry.n, cfg.width
        self.register_buffer("input_idx", torch.from_numpy(_area(geometry, input_area, "input_area")), persistent=False)
        # which token each input-area column receives (default: token i -> i-th column; a retinotopic map
        # writes each token into every column of the patch of the sheet it covers)
        self.register_buffer("input_token", _input_tokens(input_tokens, len(self.input_idx)), persistent=False)
        self.num_tokens = int(self.input_token.max()) + 1
        self._token_per_column = input_tokens is None
        self.register_buffer("output_idx", torch.from_numpy(_area(geometry, output_area, "output_area")), persistent=False)
        # areas that are the whole sheet in column order need no scatter or gather (wide sheets: ~2% of a step)
        everyone = torch.arange(n)
        self._input_is_sheet = self._token_per_column and torch.equal(self.input_idx, everyone)
        self._output_is_sheet = torch.equal(self.output_idx, everyone)
        self.register_buffer("wiring_weight", self.wiring_weights(self.connectivity.dist), persistent=False)
        # sparse edges travel with the model (and its checkpoints: rewiring changes them)
        conn = self.connectivity
        self.register_buffer("edge_index", None if conn.is_dense else conn.index.clone())
        self.register_buffer("edge_mask", None if conn.is_dense else conn.mask.clone())

        # learned geometry: the coordinates are parameters; `initial_geometry` keeps where the columns started
        self.initial_geometry = geometry
        self.positions = None
        if cfg.learn_positions:
            if geometry.metric != "euclidean" or geometry.n > _LEARNED_MAX_N:
                raise ValueError(
                    f"learn_positions needs a euclidean geometry of at most {_LEARNED_MAX_N} columns (got "
                    f"{geometry.name}, {geometry.n} columns, metric {geometry.metric}): use grid, stacked or multilayer"
                )
            self.positions = nn.Parameter(torch.from_numpy(geometry.coords).float())  # (N, D)
            self.initial_spread = float(np.sqrt(((geometry.coords - geometry.coords.mean(0)) ** 2).sum(1).mean()))
            d = geometry.pair_distances(*np.triu_indices(geometry.n, 1), along_sheet=True)
            self.min_spacing = float(d.min()) if len(d) else 1.0

        num_blocks = 1 if cfg.recurrent else cfg.steps
        coords = geometry.coords if cfg.mixture == "topo" else None
        self.blocks = nn.ModuleList(ColumnBlock(cfg, self.connectivity, coords, i) for i in range(num_blocks))
        for m in self.blocks.modules():  # checkpointing is the memory mode: norms and MLPs recompute inside too
            if isinstance(m, (UntiedLayerNorm, Mlp)):
                m.recompute = cfg.checkpoint
        self.pos_embed = nn.Parameter(torch.zeros(n, c)) if cfg.pos_embed else None
        self.time_embed = nn.Parameter(torch.zeros(cfg.steps, c)) if cfg.time_embed else None
        # halting unit per column (shared when the MLPs are tied): state (N, B, C) -> logit (N, B, 1)
        self.halt = linear(n, c, 1, cfg.untied_mlp) if cfg.halting != "none" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in (self.pos_embed, self.time_embed):
            if emb is not None:
                nn.init.trunc_normal_(emb, std=INIT_STD)
        if self.halt is not None:
            self.halt.reset_parameters()
            nn.init.constant_(self.halt.bias, self.cfg.halt_bias)
        if self.cfg.attn_bias != "none":
            init = self.bias_init(self.connectivity.dist)
            if self.cfg.attn_mode == "linmixing" and self.cfg.attn_bias == "local":
                # linear weights: start as the softmax of the local bias, a normalised local average
                mask = None if self.connectivity.is_dense else self.connectivity.mask
                init = (init if mask is None else init.masked_fill(~mask, float("-inf"))).softmax(-1)
            for block in self.blocks:
                block.attn.bias.data.copy_(init)

    def wiring_weights(self, dist: torch.Tensor) -> torch.Tensor:
        """``W = D^p / mean(D^p)`` for edges of length ``dist``, (N, N) or (N, K), float32."""
        p = self.cfg.wiring_p
        return (dist.double() ** p / self.geometry.mean_distance_power(p)).float()

    def bias_init(self, dist: torch.Tensor) -> torch.Tensor:
        """Initial attention bias of edges of length ``dist``: ``clamp(-d^2 / 2 sigma^2, min)`` or zeros."""
        if self.cfg.attn_bias == "local":
            return local_bias_init(dist, self.cfg.bias_sigma, self.cfg.bias_min)
        return torch.zeros_like(dist)

    @property
    def n(self) -> int:
        return self.geometry.n

    def learned_wiring(self) -> tuple[torch.Tensor, torch.Tensor]:
        """With learned positions: the wiring weights (N, N) or (N, K) of the current positions (differentiable;
        ``mean(D^p)`` over all N*N ordered pairs of the current positions, as for a fixed geometry) and the
        repulsion term ``sum_{i != j} relu(1 - d_ij / s0)^2 / N``."""
        pos = self.positions
        n = pos.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=pos.device)
        d2 = (pos.unsqueeze(1) - pos.unsqueeze(0)).pow(2).sum(-1)  # (N, N)
        d = torch.where(off, d2.clamp_min(1e-12).sqrt(), torch.zeros_like(d2))  # no NaN gradient on the diagonal
        gap = self.geometry.gap
        if gap:
            d = (d.pow(2) + gap**2).sqrt()
        p = self.cfg.wiring_p
        dp = torch.where(off | (gap > 0), d.clamp_min(1e-12).pow(p), torch.zeros_like(d))
        w = dp / dp.mean()
        if self.edge_index is not None:
            w = w.gather(1, self.edge_index)  # (N, K)
        repulsion = torch.where(off, (1 - d / self.min_spacing).relu().pow(2), torch.zeros_like(d)).sum() / n
        return w, repulsion

    @torch.no_grad()
    def constrain_positions(self) -> None:
        """``position_constraint=fixed_spread``: rescale the positions about their centroid to the initial RMS spread
        (the trainer calls this after every optimizer step)."""
        if self.positions is None or self.cfg.position_constraint == "none":
            return
        centre = self.positions.mean(0, keepdim=True)
        spread = (self.positions - centre).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
        self.positions.copy_(centre + (self.positions - centre) * (self.initial_spread / spread))

    @torch.no_grad()
    def sync_geometry(self) -> None:
        """Make ``geometry`` (and the connectivity's distances) the learned positions, for analysis and rewiring;
        layer labels are kept, grid shapes dropped (the columns moved off the grid)."""
        if self.positions is None:
            return
        g0 = self.initial_geometry
        self.geometry = Geometry(self.positions.detach().double().cpu().numpy(), layer=g0.layer,
                                 name=f"learned({g0.name})", gap=g0.gap)
        conn = self.connectivity
        if conn.is_dense:
            self.connectivity = Connectivity.dense(self.geometry)
        else:
            self.connectivity = Connectivity.from_index(self.geometry, self.edge_index.cpu(), self.edge_mask.cpu(),
                                                        kind=conn.kind, scale=conn.scale)

    def block_plan(self) -> BlockPlan | FlexPlan | FusedPlan | None:
        """How the sparse kernel visits the current edges, or None for the gather kernel (and dense sheets).

        A ``FusedPlan`` (the fused C++ kernel: ``sparse_kernel='fused'``, or ``'auto'`` on CPU when the kernel
        builds), a ``BlockPlan`` (the block kernel) or a ``FlexPlan`` (the FlexAttention backend,
        ``sparse_kernel='flex'`` on CUDA; on CPU ``flex`` runs the block kernel). Built from the geometry's
        coordinates on first use and cached; rebuilt when the edge buffers change (``rewire_sheet``,
        ``load_state_dict``) or move to another device. When ``sparse_kernel='auto'`` cannot use the fused
        kernel, the block kernel runs when its plan's estimated cost is below the gather kernel's
        (``block_sparse.plan_costs``).
        """
        if self.edge_index is None:
            return None
        kernel = self.cfg.sparse_kernel
        device = self.edge_index.device
        if kernel == "fused" and device.type != "cpu":
            raise ValueError(
                f"sparse_kernel='fused' is a CPU kernel but the sheet is on {device.type}: use sparse_kernel='flex' or "
                "'block' on a GPU (or 'auto', which picks a kernel for the device)"
            )
        fused = kernel == "fused" or (kernel == "auto" and device.type == "cpu" and fused_available())
        if not fused and (kernel == "gather" or self.positions is not None):
            return None  # learned layouts run the gather kernel (its tiles come from fixed coordinates)
        versions = (self.edge_index._version, self.edge_mask._version, self.edge_index.data_ptr(), device, fused)
        plan = self._plan
        if plan is None or plan.versions != versions:
            if fused:
                build = build_fused_plan
            elif kernel == "flex" and flex_runs_on(device):
                build = build_flex_plan
            else:
                build = build_block_plan
            plan = build(self.geometry.coords, self.edge_index, self.edge_mask).to(device)
            plan.versions = versions
            self._plan = plan
        if kernel == "auto" and isinstance(plan, BlockPlan) and plan.cost >= plan.gather_cost:
            return None
        return plan

    def forward(
        self, tokens: torch.Tensor, record: Iterable[str] = (), steps: int | None = None
    ) -> tuple[torch.Tensor, Trace]:
        """``steps``: unroll a recurrent sheet for another number of steps than it was trained with
        (steps past T reuse the last step's time embedding); None: ``cfg.steps``."""
        # one session per forward: untied weights are tapped (cast, fused) once and their
        # gradients over all steps are computed in one batched matmul (see layers.py). A checkpointing
        # sheet does not fuse: the concatenated q|k weight would live through the whole backward
        # (4 KiB per column of the benchmark sheet; the separate matmuls measured no slower)
        reused = self.cfg.recurrent and (steps if steps is not None else self.cfg.steps) > 1
        with untied_session(fuse=reused and not self.cfg.checkpoint):
            return self._forward(tokens, record, steps)

    @contextlib.contextmanager
    def run_steps_with(self, runner):
        """Within this context every forward runs step t as ``runner(t, block, h, record, plan, wiring_weight)``
        instead of ``block(h, ...)``, which must return what the block returns: (output (N, B, C), AttentionStats,
        qk or None). ``chunked_backward`` runs the steps without a graph and differentiates them chunk by chunk."""
        previous = self._step_runner
        self._step_runner = runner
        try:
            yield
        finally:
            self._step_runner = previous

    def _step(self, block: ColumnBlock, session, x: torch.Tensor, record: frozenset, plan: BlockPlan | FlexPlan | FusedPlan | None, wiring_weight):
        """One block step under ``session`` (a checkpointed step recomputed in backward reuses the forward's
        tapped untied weights, so the recomputed graph saves the same tensors)."""
        with reuse_session(session):
            return block(x, wiring_weight, self.edge_index, self.edge_mask, record, plan)

    def _forward(self, tokens: torch.Tensor, record: Iterable[str], steps: int | None = None) -> tuple[torch.Tensor, Trace]:
        record = frozenset(record)
        if steps is None:
            steps = self.cfg.steps
        elif steps < 1 or (not self.cfg.recurrent and steps != self.cfg.steps):
            raise ValueError(
                f"steps={steps}: a recurrent sheet runs any number of steps >= 1; a feed-forward sheet only its "
                f"{self.cfg.steps} blocks"
            )
        if not record <= set(RECORDABLE):
            raise ValueError(f"record={sorted(record)}: allowed entries are {RECORDABLE}")
        if tokens.ndim != 3 or tokens.shape[1] != self.num_tokens or tokens.shape[2] != self.cfg.width:
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)} but the sheet expects (B, {self.num_tokens}, "
                f"{self.cfg.width}): one token per input-area column, width {self.cfg.width}"
            )
        B, n_in, C = tokens.shape
        inp = tokens.transpose(0, 1)  # (n_tokens, B, C)
        if not self._token_per_column:
            inp = inp.index_select(0, self.input_token)  # (n_in, B, C): each input column's token
        if self._input_is_sheet:
            x = inp.contiguous()  # (N, B, C)
        else:
            x = tokens.new_zeros(self.n, B, C).index_add(0, self.input_idx, inp)  # (N, B, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(1)
        plan = self.block_plan()
        trace = Trace(
            attn=[] if "attn" in record else None,
            features=[] if "features" in record else None,
            qk=[] if "qk" in record else None,
            states=[] if "states" in record else None,
        )
        halting = None if self.halt is None else _Halting(self.cfg, self.n, B, steps, x)
        wiring_weight = self.wiring_weight
        if self.positions is not None:
            wiring_weight, trace.repulsion = self.learned_wiring()
            trace.repulsion_weight = self.cfg.position_repulsion
        for t in range(steps):
            h = x  # (N, B, C): the step's input
            if t > 0 and self.cfg.inject == "every":
                h = h + inp if self._input_is_sheet else h.index_add(0, self.input_idx, inp)
            if self.time_embed is not None:
                h = h + self.time_embed[min(t, self.cfg.steps - 1)]
            block = self.blocks[0 if self.cfg.recurrent else t]
            if self._step_runner is not None:
                h, stats, qk = self._step_runner(t, block, h, record, plan, wiring_weight)
            elif self.cfg.checkpoint and torch.is_grad_enabled():
                h, stats, qk = torch.utils.checkpoint.checkpoint(
                    self._step, block, current_session(), h, record, plan, wiring_weight, use_reentrant=False
                )
            else:
                h, stats, qk = block(h, wiring_weight, self.edge_index, self.edge_mask, record, plan)
            x = h if halting is None else halting.step(t, x, h, self.halt)
            trace.wiring.append(stats.wiring)
            trace.entropy.append(stats.entropy)
            if block.coef is not None:
                load, mix_entropy = block.coef.stats()
                trace.expert_load = (trace.expert_load or []) + [load]
                trace.mix_entropy = (trace.mix_entropy or []) + [mix_entropy]
            if trace.attn is not None:
                trace.attn.append(stats.attn)
            if trace.features is not None:
                trace.features.append(x.detach().transpose(0, 1))  # (B, N, C)
            if trace.qk is not None:
                trace.qk.append(qk)
            if trace.states is not None:
                trace.states.append(x)  # (N, B, C), differentiable
        if halting is not None:
            x = halting.finish(trace)  # (N, B, C): the halting-weighted mixture of the states
        out = x if self._output_is_sheet else x.index_select(0, self.output_idx)  # (n_out, B, C)
        return out.transpose(0, 1), trace  # (B, n_out, C)


class _Halting:
    """The masked halting loop's running state (see the module docstring); one per forward pass."""

    def __init__(self, cfg: SheetConfig, n: int, batch: int, steps: int, x: torch.Tensor):
        self.cfg, self.steps = cfg, steps
        f32 = dict(dtype=torch.float32, device=x.device)
        self.running = torch.ones(n, batch, dtype=torch.bool, device=x.device)  # (N, B) not yet halted
        self.cum = torch.zeros(n, batch, **f32)  # halting probability spent before this step
        self.survive = torch.ones(n, batch, **f32)  # ponder: prod_{s<t} (1 - lambda_s)
        self.remainder = torch.zeros(n, batch, **f32)  # act: R of the halting step
        self.count = torch.zeros(n, batch, **f32)  # steps run
        self.out = torch.zeros_like(x, dtype=torch.float32)  # sum_t w_t x_t
        self.weights: list[torch.Tensor] = []
        self.dtype = x.dtype

    def step(self, t: int, x: torch.Tensor, new: torch.Tensor, unit: nn.Module) -> torch.Tensor:
        run = self.running
        x = torch.where(run.unsqueeze(-1), new, x)  # (N, B, C): a halted column keeps its state
        lam = torch.sigmoid(unit(x).squeeze(-1).float())  # (N, B)
        if self.cfg.halting == "act":
            p = lam
        else:
            p = lam * self.survive
            self.survive = self.survive * (1 - lam)
        halt_now = run & ((self.cum + p >= 1 - self.cfg.halt_eps) | (t == self.steps - 1))
        w = torch.where(halt_now, 1 - self.cum, torch.where(run, p, torch.zeros_like(p)))  # (N, B)
        self.remainder = torch.where(halt_now, 1 - self.cum, self.remainder)
        self.cum = self.cum + w
        self.count = self.count + run.float()
        self.running = run & ~halt_now
        self.out = self.out + w.unsqueeze(-1) * x.float()
        self.weights.append(w)
        self.dtype = x.dtype
        return x

    def finish(self, trace: Trace) -> torch.Tensor:
        w = torch.stack(self.weights)  # (T, N, B)
        if self.cfg.halting == "act":
            ponder = (self.count + self.remainder).mean()  # N + R
        else:
            t = torch.arange(1, self.steps + 1, device=w.device, dtype=torch.float32)
            prior = self.cfg.ponder_prior * (1 - self.cfg.ponder_prior) ** (t - 1)
            log_prior = (prior / prior.sum()).log().view(-1, 1, 1)  # (T, 1, 1) renormalised over the steps
            ponder = (torch.special.xlogy(w, w) - w * log_prior).sum(0).mean()  # KL(w || prior)
        trace.halt_weights = w.detach().permute(0, 2, 1)  # (T, B, N)
        trace.halt_steps = self.count.detach().t()  # (B, N)
        trace.ponder, trace.ponder_weight = ponder, self.cfg.ponder_weight
        return self.out.to(self.dtype)
