"""``task: addition | multiplication | switch`` — algorithmic probes on digit strings (seed 003).

Each example is two n-digit operands (both exactly n significant digits; n = 1 allows 0-9) and an
operator token, written least-significant digit first into ``W = max_digits`` slots per operand:

    layout line  (S = 2W + 1):     a_0 .. a_{W-1}  op  b_0 .. b_{W-1}
    layout grid  (S = 2(W + 1)):   row 0: a_0 .. a_{W-1} op        (digit i of a above digit i of b:
                                   row 1: b_0 .. b_{W-1} PAD        use a [2, W+1] grid or bottom layer)

Unused slots hold PAD. The answer is read from the first ``out_len`` output-area columns, least
significant digit first, at the operands' offset, PAD elsewhere:

    addition        a + b        n + 1 answer digits (the last is the carry, possibly 0)   out_len W + 1
    multiplication  a * b        2n answer digits                                          out_len 2W
    switch          a + b or a - b, chosen by the op token (+ or -); for - the operands are
                    ordered so that a >= b; n + 1 answer slots, the last is PAD for -       out_len W + 1

Splits. Training and validation use lengths ``min_digits .. train_digits`` (L); the test split holds
``test_size`` examples of those lengths (in distribution) and ``test_size`` of lengths L+1 .. W (out of
distribution, when W > L). Every unordered operand pair is assigned to one split by a seeded hash, so no
pair (in either order) is in two splits; out-of-distribution lengths never occur in training. With
``random_offset`` the training operands start at a random slot in ``0 .. W - n`` (and the answer with
them), so untied columns beyond slot L see digits during training; validation and test start at slot 0.

Metrics: ``acc`` exact-sequence accuracy (every output slot right, PAD included), ``digit_acc`` over
answer digits, ``acc_id`` / ``acc_ood`` by length, ``acc_len<n>`` per length, and for ``switch``
``acc_add`` / ``acc_sub`` per operator.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from ..factory import build_sheet
from ..sequence import SequenceColumnformer, SequenceHead, TokenEmbed
from .base import Task, TaskConfig

SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}
_SPLIT_RANGES = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}  # share of operand pairs per split


class ArithmeticConfig(TaskConfig):
    """Digit-string arithmetic: sizes, lengths, layout. See the module docstring for the format."""

    name: Literal["addition", "multiplication", "switch"] = "addition"
    base: int = Field(10, ge=2, le=36, description="number base (digits 0 .. base-1)")
    min_digits: int = Field(1, ge=1, description="shortest operand length (training and in-distribution test)")
    train_digits: int = Field(3, ge=1, description="L: longest operand length seen in training")
    max_digits: int | None = Field(
        None, ge=1, description="W: slots per operand and longest test length (None: 2L); lengths L+1..W are out of distribution"
    )
    layout: Literal["line", "grid"] = Field("line", description="operands in one row (line) or digit-aligned rows (grid)")
    random_offset: bool = Field(
        True, description="training operands start at a random slot in 0..W-n (validation and test at slot 0)"
    )
    train_size: int = Field(20000, ge=1, description="training examples (drawn once, seeded)")
    val_size: int = Field(1000, ge=1, description="validation examples (in distribution)")
    test_size: int = Field(1000, ge=1, description="test examples in distribution, and as many out of distribution")
    data_seed: int = Field(0, description="seed of the pair-to-split hash and of the drawn examples")

    @model_validator(mode="after")
    def _check(self) -> "ArithmeticConfig":
        w = self.width
        if self.min_digits > self.train_digits:
            raise ValueError(f"task.min_digits={self.min_digits} exceeds task.train_digits={self.train_digits}")
        if w < self.train_digits:
            raise ValueError(f"task.max_digits={w} must be at least task.train_digits={self.train_digits}")
        if self.base ** (2 * w) >= 2**62:
            raise ValueError(
                f"base {self.base} numbers of {w} digits overflow 64-bit products; lower task.max_digits "
                f"(at most {int(61 / np.log2(self.base)) // 2} for this base)"
            )
        return self

    # ---- the format, derived from the options
    @property
    def width(self) -> int:
        """W: slots per operand."""
        return self.max_digits if self.max_digits is not None else 2 * self.train_digits

    @property
    def seq_len(self) -> int:
        return 2 * self.width + 1 if self.layout == "line" else 2 * (self.width + 1)

    @property
    def out_len(self) -> int:
        return 2 * self.width if self.name == "multiplication" else self.width + 1

    @property
    def pad(self) -> int:
        return self.base

    @property
    def ops(self) -> dict[str, int]:
        """Operator -> its token id."""
        b = self.base
        return {"+": b + 1, "-": b + 2, "*": b + 3}

    @property
    def vocab_in(self) -> int:
        return self.base + 4

    @property
    def vocab_out(self) -> int:
        return self.base + 1  # digits and PAD


# ------------------------------------------------------------------ generation
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wraps)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_split_value(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per unordered operand pair and seed; it decides the pair's split."""
    lo, hi = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(lo + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)) ^ hi)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def split_of_pairs(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """The split name ('train' / 'val' / 'test') each operand pair belongs to."""
    u = pair_split_value(a, b, seed)
    return np.where(u < _SPLIT_RANGES["train"][1], "train", np.where(u < _SPLIT_RANGES["val"][1], "val", "test"))


def digits_of(x: np.ndarray, slots: int, base: int, start: np.ndarray, count: np.ndarray, pad: int) -> np.ndarray:
    """(M, slots): digit j of x (least significant first) at slot start + j for j < count, pad elsewhere."""
    j = np.arange(slots)[None, :] - start[:, None]  # (M, slots)
    valid = (j >= 0) & (j < count[:, None])
    power = np.asarray(base, dtype=np.int64) ** np.clip(j, 0, None)
    return np.where(valid, (x[:, None] // power) % base, pad)


def draw_examples(cfg: ArithmeticConfig, split: str, lengths: tuple[int, int], size: int, offsets: bool, stream: int):
    """``size`` examples of the split with operand lengths drawn uniformly in ``lengths`` (inclusive).

    Returns numpy arrays: tokens (M, S), target (M, out_len), length (M,), op (M,) (0: +, 1: -, 2: *).
    Pairs outside the split (by the pair hash) are rejected and redrawn.
    """
    rng = np.random.default_rng([cfg.data_seed, SPLIT_STREAMS[split], stream])
    base, w = cfg.base, cfg.width
    a_all, b_all, n_all = [], [], []
    need = size
    while need > 0:
        m = max(64, 2 * need)
        n = rng.integers(lengths[0], lengths[1] + 1, size=m)
        lo = np.where(n == 1, 0, base ** (n - 1).astype(np.int64))
        hi = base ** n.astype(np.int64)
        a, b = rng.integers(lo, hi), rng.integers(lo, hi)
        keep = split_of_pairs(a, b, cfg.data_seed) == split
        a_all.append(a[keep]), b_all.append(b[keep]), n_all.append(n[keep])
        need -= int(keep.sum())
    a, b, n = (np.concatenate(v)[:size] for v in (a_all, b_all, n_all))
    if cfg.name == "switch":
        op = rng.integers(0, 2, size=size)  # 0: +, 1: -
        a, b = np.where(op == 1, np.maximum(a, b), a), np.where(op == 1, np.minimum(a, b), b)
    else:
        op = np.full(size, 2 if cfg.name == "multiplication" else 0)
    start = rng.integers(0, w - n + 1) if offsets else np.zeros(size, dtype=np.int64)
    result = np.select([op == 0, op == 1], [a + b, a - b], a * b)
    ans_len = np.select([op == 0, op == 1], [n + 1, n], 2 * n)
    pad = cfg.pad
    A, B = digits_of(a, w, base, start, n, pad), digits_of(b, w, base, start, n, pad)  # (M, W)
    op_tok = np.asarray([cfg.ops["+"], cfg.ops["-"], cfg.ops["*"]])[op][:, None]  # (M, 1)
    if cfg.layout == "line":
        tokens = np.concatenate([A, op_tok, B], axis=1)  # (M, 2W + 1)
    else:
        tokens = np.concatenate([A, op_tok, B, np.full_like(op_tok, pad)], axis=1)  # (M, 2(W + 1)), row-major
    target = digits_of(result, cfg.out_len, base, start, ans_len, pad)  # (M, out_len)
    return tokens, target, n, op


class ArithmeticDataset(Dataset):
    """In-memory examples ``(tokens, target, length, op)``; also keeps the operands' lengths per example."""

    def __init__(self, tokens, target, length, op):
        self.tokens = torch.as_tensor(tokens, dtype=torch.int64)
        self.target = torch.as_tensor(target, dtype=torch.int64)
        self.length = torch.as_tensor(length, dtype=torch.int64)
        self.op = torch.as_tensor(op, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:  # drawn once: every epoch sees the same examples
        return None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.tokens[i], self.target[i], self.length[i], self.op[i]


def build_arithmetic_sets(cfg: ArithmeticConfig) -> dict[str, ArithmeticDataset]:
    """The train / val / test splits of a task config (deterministic in ``cfg.data_seed``)."""
    ind = (cfg.min_digits, cfg.train_digits)
    sets = {
        "train": draw_examples(cfg, "train", ind, cfg.train_size, cfg.random_offset, stream=0),
        "val": draw_examples(cfg, "val", ind, cfg.val_size, False, stream=0),
    }
    test = [draw_examples(cfg, "test", ind, cfg.test_size, False, stream=0)]
    if cfg.width > cfg.train_digits:
        test.append(draw_examples(cfg, "test", (cfg.train_digits + 1, cfg.width), cfg.test_size, False, stream=1))
    sets["test"] = tuple(np.concatenate(parts) for parts in zip(*test))
    return {k: ArithmeticDataset(*v) for k, v in sets.items()}


# ------------------------------------------------------------------ the task
class ArithmeticTask(Task):
    """Batches ``(tokens, target, length, op)``; outputs logits (B, out_len, base + 1); loss cross-entropy."""

    select = ("acc", "max")

    def __init__(self, cfg: ArithmeticConfig, model_cfg):
        super().__init__(cfg, model_cfg)
        self.name = cfg.name
        lengths = range(cfg.min_digits, cfg.width + 1)
        ops = ("add", "sub") if cfg.name == "switch" else ()
        self.sum_keys = (
            "correct", "digits_correct", "digits", "correct_id", "n_id", "correct_ood", "n_ood",
            *(f"{k}_len{n}" for n in lengths for k in ("correct", "n")),
            *(f"{k}_{o}" for o in ops for k in ("correct", "n")),
        )

    def datasets(self, data_cfg, model_cfg, seed: int = 0):
        return build_arithmetic_sets(self.cfg)

    def build_model(self):
        m, cfg = self.model_cfg, self.cfg
        if m.input_area == "retinotopic":
            raise ValueError(f"task {cfg.name} writes one token per input column; set model.input_area to bottom or all")
        sheet = build_sheet(m)
        if sheet.num_tokens != cfg.seq_len:
            raise ValueError(
                f"task {cfg.name} (layout {cfg.layout}, max_digits {cfg.width}) writes {cfg.seq_len} tokens, but the "
                f"sheet's input area has {sheet.num_tokens} columns; use e.g. model.geometry.kind=grid with "
                f"model.geometry.shape=[1, {2 * cfg.width + 1}] (line) or [2, {cfg.width + 1}] (grid) and "
                "model.input_area=all"
            )
        width = m.sheet.width
        return SequenceColumnformer(TokenEmbed(cfg.vocab_in, width), sheet, SequenceHead(width, cfg.out_len, cfg.vocab_out))

    @property
    def analysis_classes(self) -> int:
        return self.cfg.width - self.cfg.min_digits + 1

    def analysis_labels(self, batch):
        """Class of an example for ``analyze``'s topography: its operand length (min_digits -> 0)."""
        return batch[2] - self.cfg.min_digits

    def loss(self, outputs, batch, reduction="mean", train=True):
        per_slot = F.cross_entropy(outputs.float().transpose(1, 2), batch[1], reduction="none")  # (B, out_len)
        per_example = per_slot.mean(1)
        return per_example.mean() if reduction == "mean" else per_example.sum()

    def metric_sums(self, outputs, batch):
        cfg = self.cfg
        target, length, op = batch[1], batch[2], batch[3]
        pred = outputs.argmax(-1)  # (B, out_len)
        exact = (pred == target).all(1)  # (B,)
        answer = target != cfg.pad
        sums = {
            "correct": exact.sum().item(),
            "digits_correct": ((pred == target) & answer).sum().item(),
            "digits": answer.sum().item(),
        }
        ood = length > cfg.train_digits
        for tag, sel in (("id", ~ood), ("ood", ood)):
            sums[f"correct_{tag}"], sums[f"n_{tag}"] = (exact & sel).sum().item(), sel.sum().item()
        for n in range(cfg.min_digits, cfg.width + 1):
            sel = length == n
            sums[f"correct_len{n}"], sums[f"n_len{n}"] = (exact & sel).sum().item(), sel.sum().item()
        if cfg.name == "switch":
            for name, code in (("add", 0), ("sub", 1)):
                sel = op == code
                sums[f"correct_{name}"], sums[f"n_{name}"] = (exact & sel).sum().item(), sel.sum().item()
        return sums

    def metrics(self, sums, n):
        out = {"acc": sums["correct"] / n, "digit_acc": sums["digits_correct"] / max(sums["digits"], 1)}
        groups = ["id", "ood", *(f"len{k}" for k in range(self.cfg.min_digits, self.cfg.width + 1))]
        if self.cfg.name == "switch":
            groups += ["add", "sub"]
        for g in groups:
            if sums[f"n_{g}"]:
                out[f"acc_{g}"] = sums[f"correct_{g}"] / sums[f"n_{g}"]
        return out
