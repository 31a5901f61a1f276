"""The training loop: one process (or one rank of ``torchrun``), checkpoints that survive.

    train(cfg)            new run in cfg.out_dir/cfg.name
    train(cfg, resume=True) continue from checkpoints/last.pt exactly where it stopped
    init_from=RUN         start from another run's final weights (fine-tuning; a fresh optimiser, and a
                          fresh head when the other run had another task's head)

The objective comes from the run's task (``tasks/``: classify, mim, ...): loss = the task's loss +
wiring_lambda * wiring cost (both logged), metrics and evaluation are the task's. AdamW without weight decay on
biases, norms, embeddings and attention biases; linear warm-up then cosine decay; gradient
clipping and accumulation. Data order and augmentation are keyed by (seed, epoch, index), and the
checkpoint stores the position inside the epoch, so a resumed run replays exactly the batches an
uninterrupted run would have seen.

Under ``torchrun`` (see ``distributed.py``) the global batch ``train.batch_size`` is split over the
ranks and the loss of every batch is normalised by its *global* sample count, so W processes take
the same optimizer steps as one (up to float summation order) — including the last, smaller batch of
an epoch, whose missing samples on some ranks are left out (a rank with none runs one sample with
weight 0). ``train.precision``: fp32, bf16 autocast (CPU or GPU), fp16 autocast with gradient
scaling (CUDA only); ``train.compile`` wraps the training module in ``torch.compile``;
``train.tracking`` adds TensorBoard / W&B next to metrics.jsonl (see ``tracking.py``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, load_model_state, load_pretrained, save_checkpoint
from .chunked_backward import ChunkedBackward
from .config import ConfigError, RunConfig, build_config, run_altering_changes
from .data import EpochSampler
from .factory import count_parameters
from .optim import AdamW
from .regularizers import PENALTIES, SPARSITY_METRICS, SheetRegularizer, SparsityStats
from .run import MetricsLog, provenance, remove_run, run_lock, write_config, write_json
from .runtime import autocast_context, cache_host_memory, keep_host_memory, resolve_device, seed_everything
from .tasks import build_task, evaluate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunExistsError(FileExistsError):
    """A run directory with checkpoints already exists and would be overwritten."""


# ------------------------------------------------------------------ building blocks
def param_groups(model: torch.nn.Module, weight_decay: float, position_lr: float | None = None) -> list[dict]:
    """Weight decay on weight matrices only; none on biases, norms, embeddings, attention biases and the
    temperatures of mixture coefficients. Learned column positions get their own group: no decay, and
    ``position_lr`` when given."""
    from torch import nn

    from .layers import UntiedLayerNorm
    from .mixture import MixtureLayerNorm
    from .sequence import TokenEmbed

    no_decay_ids = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            norm = isinstance(module, (nn.LayerNorm, UntiedLayerNorm, MixtureLayerNorm, TokenEmbed))
            names = ("bias", "pos_embed", "time_embed", "pool_weight", "mask_token", "query_embed", "scale")
            if norm or pname in names:
                no_decay_ids.add(id(p))  # biases (incl. attention biases), norms, embeddings
    positions = getattr(getattr(model, "sheet", None), "positions", None)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and p is not positions:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if positions is not None:
        groups.append({"params": [positions], "weight_decay": 0.0, **({"lr": position_lr} if position_lr else {})})
    return groups


def lr_lambda(total_steps: int, warmup_frac: float, min_lr_frac: float):
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to ``min_lr_frac``."""
    warmup = max(1, int(round(total_steps * warmup_frac))) if warmup_frac > 0 else 0

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


# ------------------------------------------------------------------ the loop
_WINDOW_SUMS = ("loss", "task_loss", "wiring_cost", "attn_entropy", "n")
_HALTING_SUMS = ("ponder_steps", "ponder_cost")  # logged for sheets with halting only
_MIXTURE_SUMS = ("mix_entropy", "expert_load_max")  # logged for sheets with weight banks only
_POSITION_SUMS = ("repulsion", "position_shift")  # logged for sheets with learned positions only


class Trainer:
    """Holds the state of one run; ``fit()`` trains, evaluates and writes the run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, dist=None, extending: bool = False):
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        self.extending = extending  # resume --extend: train.epochs may exceed the checkpoint's
        self.is_main = dist is None or dist.rank == 0
        tc = cfg.train
        from .tracking import build_trackers, check_available

        check_available(tc.tracking)  # before any work: a missing extra fails fast, on every rank
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device) if dist is None else dist.device
        self.host_memory_kept = keep_host_memory() if tc.keep_host_memory else False
        if tc.keep_host_memory and not self.host_memory_kept and self.is_main:
            print("note: train.keep_host_memory needs glibc malloc (Linux); ignored here", file=sys.stderr)
        self.host_memory_cached = cache_host_memory() if tc.cache_host_memory else False
        if tc.cache_host_memory and not self.host_memory_cached and self.is_main:
            print("note: train.cache_host_memory needs the C++ kernels, which could not be built; ignored here",
                  file=sys.stderr)
        seed_everything(tc.seed)
        self.task = build_task(cfg.task, cfg.model)
        self.model = self.task.build_model()  # before the data: a geometry/input mismatch fails before a slow load
        self.data_sets = self.task.datasets(cfg.data, cfg.model, seed=tc.seed)  # labelled images, or generated
        self.sets = {split: self.task.dataset(ds, split, seed=tc.seed) for split, ds in self.data_sets.items()}
        for msg in self.task.data_warnings(self.data_sets) if self.is_main else ():
            print(f"warning: {msg}", file=sys.stderr, flush=True)
        self.init_report = None
        if cfg.init_from is not None and not resume:  # fine-tuning: weights only, the optimiser starts afresh
            self.init_report = load_pretrained(self.model, cfg.init_from)
            if self.is_main:
                skipped = ", ".join(self.init_report["skipped"]) or "none"
                print(f"init_from {cfg.init_from}: loaded {self.init_report['loaded']} tensors; re-initialised "
                      f"(head shape differs or absent): {skipped}", file=sys.stderr)
        self.model = self.model.to(self.device)
        self.num_params = count_parameters(self.model)
        sheet = getattr(self.model, "sheet", None)
        self.halting = getattr(sheet, "halt", None) is not None
        self.mixture = sheet is not None and any(getattr(b, "coef", None) is not None for b in sheet.blocks)
        # penalties on activity / weights, and the activation-sparsity metrics of the column states
        self.regularizer = None
        if sheet is not None and any(getattr(tc.penalties, p).weight > 0 for p in PENALTIES):
            self.regularizer = SheetRegularizer(tc.penalties, sheet, sheet.geometry.coords)
        self.log_sparsity = sheet is not None and tc.log_sparsity
        self.needs_states = bool(self.regularizer and self.regularizer.needs_states)
        self.learned_positions = getattr(sheet, "positions", None) is not None
        if dist is not None and tc.parallel == "fsdp" and (
            self.learned_positions or (self.regularizer and "weight_smoothness" in self.regularizer.active)
        ):
            raise ValueError(
                "learned positions and train.penalties.weight_smoothness read whole per-column tensors, which FSDP "
                "shards across processes: use train.parallel=ddp for them"
            )
        if tc.reconnect_every and not (self.learned_positions and cfg.model.connectivity.kind != "dense"):
            raise ValueError(
                "train.reconnect_every rebuilds a sparse sheet's edges from learned positions: it needs "
                "model.sheet.learn_positions=true and a local connectivity"
            )
        self.extra_keys = (
            *(_HALTING_SUMS if self.halting else ()), *(_MIXTURE_SUMS if self.mixture else ()),
            *(_POSITION_SUMS if self.learned_positions else ()),
            *(self.regularizer.active if self.regularizer else ()),
        )
        sparsity_sums = (*SPARSITY_METRICS, "sparsity_n") if self.log_sparsity and not tc.chunked_backward else ()
        self.window_keys = (*_WINDOW_SUMS, *self.extra_keys, *sparsity_sums, *self.task.sum_keys)
        rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
        if tc.batch_size % world:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the world size {world}")
        self.local_batch = tc.batch_size // world
        self.sampler = EpochSampler(len(self.sets["train"]), shuffle=True, seed=tc.seed, rank=rank, world_size=world)
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.local_batch) // cfg.optim.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError("the training set is smaller than one optimizer step; lower train.batch_size or optim.accum_steps")
        self.total_steps = self.steps_per_epoch * tc.epochs
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        if tc.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"train.precision=fp16 needs a CUDA GPU (fp16 autocast with gradient scaling); this run is on "
                f"{self.device}. Use train.precision=bf16 on CPU"
            )
        self.train_module = self.model if dist is None else dist.wrap(self.model)
        self.wrapped = self.train_module  # DDP / FSDP module (no_sync), before torch.compile
        if tc.compile:
            self.train_module = torch.compile(self.train_module)
        self.scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
        groups = param_groups(self.model, cfg.optim.weight_decay, cfg.optim.position_lr)
        if cfg.optim.state_dtype != "fp32":  # moments in bf16 / 8 bits: 1/2 / ~1/4 of the optimizer state, same update;
            # bf16's rounding noise is seeded alike on every rank (8bit rounds to nearest), so DDP replicas stay equal
            self.optimizer = AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, seed=tc.seed,
                                   state_dtype=cfg.optim.state_dtype)
        else:  # torch's fused AdamW: one pass per parameter, 6x its for-loop on CPU (benchmarks/optimizer_step.py),
            # the same update up to rounding; not for FSDP's sharded parameters. A checkpoint's param_groups carry the
            # choice, so a run resumes with the implementation it started with.
            fused = self.device.type in ("cpu", "cuda") and not self._sharded
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused or None)
        self.chunked = None  # train.chunked_backward: the sheet's backward chunk by chunk (columnformer.chunked_backward)
        if tc.chunked_backward:
            if dist is not None or sheet is None:
                raise ValueError("train.chunked_backward runs one process on a task model with a sheet; drop it under "
                                 "torchrun")
            if self.regularizer is not None:
                raise ValueError("train.penalties read the sheet's states, which train.chunked_backward does not keep; "
                                 "set their weights to 0 or drop train.chunked_backward")
            self.chunked = ChunkedBackward(sheet, self.optimizer, tc.chunked_backward)
            self.log_sparsity = False
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.optim.warmup_frac, cfg.optim.min_lr_frac)
        )
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main and self.ckpt_dir.is_dir():  # temp files of a writer killed mid-write (we hold the run lock)
            for orphan in self.ckpt_dir.glob(".*.tmp"):
                orphan.unlink()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_score, self.train_time = None, 0.0  # best validation value of the task's ``select`` metric
        self.wall_before, self.segment_start = 0.0, time.perf_counter()  # wall time of earlier segments, this one's start
        self.window, self._resumed_window = self._empty_window(), None
        if resume:
            self._restore(self.ckpt_dir / "last.pt")
        elif self.is_main:
            self._create_run_dir()
        self.trackers = build_trackers(cfg, self.run_dir, enabled=self.is_main, resume_step=self.step if resume else None)

    def _empty_window(self) -> dict[str, float]:
        return {**{k: 0.0 for k in self.window_keys}, "time": 0.0}

    # -------------------------------------------------------------- run directory
    def _create_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.cfg, self.run_dir / "config.yaml")
        extra = {"init_from": self.init_report} if self.init_report is not None else {}
        (self.run_dir / "provenance.json").write_text(
            json.dumps({**provenance(), "num_params": self.num_params, **extra}, indent=2)
        )
        self.metrics.path.write_text("")

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def _sharded(self) -> bool:
        return self.dist is not None and getattr(self.dist, "sharded", False)

    def _state(self) -> dict[str, Any]:
        """The checkpoint state (under FSDP a collective: call it on every rank; complete on rank 0)."""
        if self.dist is not None and hasattr(self.dist, "model_state_dict"):
            model_state = self.dist.model_state_dict(self.model)
            optim_state = self.dist.optimizer_state_dict(self.model, self.optimizer)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.world_size,
            "parallel": getattr(self.dist, "parallel", None),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "position": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "best_score": self.best_score,
            "train_time": self.train_time,
            "wall_time": self.wall_time(),
            "metrics_lines": self.metrics.count(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def _weights_finite(self) -> bool:
        """Whether every parameter is finite (over all ranks' shards under FSDP)."""
        bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in self.model.parameters())
        if self.dist is not None:
            bad = int(self.dist.all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64)).item())
        return bad == 0

    def last_good(self) -> str:
        """Which checkpoint a diverged run keeps, for messages."""
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return "no checkpoint was written before it diverged"
        try:
            step = load_checkpoint(path)["position"]["step"]
        except CheckpointError:
            return f"{path} is unreadable"
        return f"the last good checkpoint is {path} (step {step})"

    def diverged(self, what: str) -> TrainingDiverged:
        """The error for a divergence detected now; rolls last.pt back if it holds the weights that just diverged.

        ``last.pt`` is kept one generation deep (``prev.pt``): when the newest checkpoint holds this very step's
        weights (they produced the non-finite values), it becomes ``diverged.pt`` and ``prev.pt`` is restored.
        """
        last, prev = self.ckpt_dir / "last.pt", self.ckpt_dir / "prev.pt"
        if self.is_main and last.exists():
            try:
                holds_this_step = load_checkpoint(last)["position"]["step"] == self.step
            except CheckpointError:
                holds_this_step = True
            if holds_this_step:
                os.replace(last, self.ckpt_dir / "diverged.pt")
                if prev.exists():
                    os.replace(prev, last)
        return TrainingDiverged(
            f"{what} at step {self.step} (epoch {self.epoch + 1}); {self.last_good()}. Start a new run with a lower "
            "optim.lr, optim.grad_clip or train.precision=fp32 (init_from=RUN keeps the good weights)"
        )

    def save(self, name: str) -> None:
        if not self._weights_finite():  # never overwrite a good checkpoint with a diverged state
            raise self.diverged("non-finite weights")
        window = dict(self.window)
        if self.dist is not None:  # the window over all ranks (a collective: every rank calls save)
            keys = self.window_keys
            total = self.dist.all_reduce_sum(torch.tensor([float(window[k]) for k in keys], dtype=torch.float64))
            window.update(zip(keys, total.tolist()))
        if self.is_main or self._sharded:
            state = self._state()
            state["window"] = window
            if self.is_main:
                path = self.ckpt_dir / f"{name}.pt"
                if name == "last" and path.exists():  # one generation back, for a divergence roll-back
                    os.replace(path, self.ckpt_dir / "prev.pt")
                save_checkpoint(state, path)
        if self.dist is not None:
            self.dist.barrier()  # the other ranks may read it next (best model, resume)

    def _load_model(self, state_dict: dict, source: str) -> None:
        if self._sharded:
            ref = self.task.build_model()  # names and shapes, checked on an unsharded copy
            load_model_state(ref, state_dict, source=source)
            self.dist.load_model_state(self.model, state_dict)
        else:
            load_model_state(self.model, state_dict, source=source)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            saved = build_config(state.get("config") or {})
        except ConfigError as exc:
            raise CheckpointError(f"the config stored in checkpoint {str(path)!r} is not valid here: {exc}") from None
        changed = [c for c in run_altering_changes(saved, self.cfg) if not (c[0] == "train.epochs" and self.extending)]
        if changed:
            shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changed[:6])
            raise CheckpointError(
                f"{self.run_dir}/config.yaml differs from the config checkpoint {str(path)!r} was trained with in keys "
                f"that change the run: {shown}{' ...' if len(changed) > 6 else ''}; restore them (or start a new run "
                "with init_from=... to continue from these weights). Safe to change on resume: logging, progress, "
                "figures, trackers, data.num_workers, train.threads / device / compile, name, out_dir"
            )
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by a run on {saved_world} process(es) but this run has "
                f"{self.world_size}; resume with the same number of processes (e.g. torchrun --nproc_per_node={saved_world} "
                "... for one node)" if saved_world > 1 else
                f"checkpoint {str(path)!r} was written by a single-process run but this run has {self.world_size} "
                "processes; resume it without torchrun"
            )
        self._load_model(state["model"], str(path))
        try:
            if self._sharded:
                self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer/scheduler state in {str(path)!r} does not match: {exc}") from None
        if self.extending:  # the learning rate of the current step on the re-planned schedule
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
        torch.set_rng_state(state["rng"]["torch"])
        pos = state["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        if state.get("window") and self.is_main:  # other ranks restart from zero: rank 0 holds the sums
            self._resumed_window = {**self._empty_window(), **state["window"]}
        self.best_score = state["best_score"] if "best_score" in state else state.get("best_acc")
        self.train_time = state["train_time"]
        self.wall_before = state.get("wall_time", 0.0)
        if self.is_main:
            self.metrics.truncate(state["metrics_lines"])

    # -------------------------------------------------------------- training
    def _loader(self, split: str, sampler=None, batch_size: int | None = None) -> DataLoader:
        # A loader's iterator draws its worker base seed from `generator`, not from the global torch RNG, so
        # the global stream is the same whether an epoch's iterator was made before a checkpoint or after a
        # resume (order and augmentation come from the sampler and per-sample seeds, not from this seed).
        return DataLoader(
            self.sets[split],
            batch_size=batch_size or self.cfg.train.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.cfg.data.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )

    def _log(self, record: dict) -> None:
        if self.is_main:
            self.metrics.write(record)
            self.trackers.log(record)

    def _bad_images(self) -> dict[str, int] | None:
        """Distinct undecodable images skipped so far per split (image datasets only; union over ranks)."""
        if not all(hasattr(ds, "bad") for ds in self.sets.values()):
            return None
        out = {}
        for split, ds in self.sets.items():
            mask = ds.bad.to(torch.int32)
            if self.dist is not None:
                mask = self.dist.all_reduce_sum(mask)
            out[split] = int((mask > 0).sum())
        return out

    def _valid_in_batch(self, micro_index: int, local_len: int) -> tuple[int, int]:
        """(samples of this rank's micro-batch that are real, not padding; samples in the global batch)."""
        n, big = len(self.sets["train"]), self.cfg.train.batch_size
        world, rank = self.dist.world_size, self.dist.rank
        m = min(big, n - micro_index * big)
        valid = min(local_len, max(0, -(-(m - rank) // world)))
        return valid, m

    def _eval_split(self, split: str) -> dict[str, float]:
        loader = self._loader(split)
        result = evaluate(self.task, self.model, loader, self.device, self.cfg.train.precision)
        if self._sharded and hasattr(self.model, "reshard"):
            self.model.reshard()  # FSDP2 leaves the root's parameters gathered after a forward without backward
        return result

    def train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; False when max_steps stopped it."""
        cfg, tc = self.cfg, self.cfg.train
        accum = cfg.optim.accum_steps
        self.sets["train"].set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.local_batch * accum)
        loader = self._loader("train", sampler=self.sampler, batch_size=self.local_batch)
        batches = iter(loader)
        # the metrics window; after a resume it continues the checkpointed one, so logged lines equal an uninterrupted run's
        self.window = self._resumed_window or self._empty_window()
        self._resumed_window = None
        bar = tqdm(
            total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{tc.epochs}",
            disable=not (tc.progress and self.is_main), leave=False, file=sys.stderr, dynamic_ncols=True,
        )
        self.model.train()
        while self.batch_in_epoch < self.steps_per_epoch:
            if self.step >= self.total_steps:
                bar.close()
                return False
            t0 = time.perf_counter()
            # activation sparsity is measured on the last micro-batch of each logged step (cheap, and a sample of the window)
            log_step = (self.step + 1) % tc.log_every == 0 or self.batch_in_epoch + 1 == self.steps_per_epoch
            for micro in range(accum):
                measure = self.log_sparsity and log_step and micro == accum - 1
                record = ("states",) if measure or self.needs_states else ()
                batch = list(next(batches))  # the task's tensors, e.g. (images, labels) or (images, mask)
                valid = None
                if self.dist is not None:  # leave out the padding of the last, smaller global batch
                    valid, global_n = self._valid_in_batch(self.batch_in_epoch * accum + micro, len(batch[0]))
                    if valid < len(batch[0]):
                        batch = [t[: max(valid, 1)] for t in batch]
                batch = [t.to(self.device) for t in batch]
                sync = self.dist.no_sync(self.wrapped) if (self.dist and micro < accum - 1) else nullcontext()
                with sync:
                    with autocast_context(tc.precision, self.device), \
                            (self.chunked.forward() if self.chunked else nullcontext()):
                        outputs, trace = self.task.forward(self.train_module, batch, record=record)
                    wiring = trace.wiring_cost.float()
                    # batch-level regularisers: the wiring cost, the sheet's own (halting: the ponder cost) and
                    # the configured penalties (train.penalties)
                    reg = tc.wiring_lambda * wiring + trace.aux_loss
                    penalty_values = {}
                    if self.regularizer is not None:
                        penalty, penalty_values = self.regularizer(trace.states, self.step, self.total_steps)
                        reg = reg + penalty
                    if valid is None:
                        b = len(batch[0])
                        task_loss = self.task.loss(outputs, batch, reduction="mean")
                        loss = task_loss + reg
                        objective = loss / accum
                    else:  # sum over this rank's samples / global count * world: DDP's mean gives the global mean
                        b = valid
                        loss_sum = self.task.loss(outputs, batch, reduction="sum") * (1.0 if b else 0.0)
                        task_loss = loss_sum / max(b, 1)
                        loss = task_loss + reg
                        objective = (loss_sum + reg * b) * (self.dist.world_size / global_n) / accum
                    if not torch.isfinite(loss):
                        bar.close()
                        raise self.diverged(f"non-finite loss ({loss.item()})")
                    if self.chunked is not None:  # pass A and B: the sheet's per-column weights are stepped here
                        self.chunked.backward(objective)
                    else:
                        (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
                self.window["loss"] += loss.item() * b
                self.window["task_loss"] += task_loss.item() * b
                self.window["wiring_cost"] += wiring.item() * b
                self.window["attn_entropy"] += trace.attn_entropy.item() * b
                if trace.halt_steps is not None:
                    self.window["ponder_steps"] += trace.halt_steps[:b].float().mean(1).sum().item()
                    self.window["ponder_cost"] += trace.ponder.item() * b
                if trace.mix_entropy is not None:  # mean over steps; the busiest expert's share of the mixing
                    self.window["mix_entropy"] += torch.stack(trace.mix_entropy).mean().item() * b
                    self.window["expert_load_max"] += torch.stack([x.max() for x in trace.expert_load]).mean().item() * b
                for k, v in penalty_values.items():
                    self.window[k] += v * b
                if self.learned_positions:
                    sheet = self.model.sheet
                    moved = (sheet.positions.detach() - torch.as_tensor(sheet.initial_geometry.coords).to(sheet.positions))
                    self.window["repulsion"] += trace.repulsion.item() * b
                    self.window["position_shift"] += moved.norm(dim=1).mean().item() * b
                if measure:  # every process calls this (a collective under torchrun), even with no valid sample
                    sp = SparsityStats(tc.sparsity_tol)
                    sp.add([x[:, :b] for x in trace.states])
                    if self.dist is not None:
                        sp.all_reduce(self.dist.all_reduce_sum)
                    if self.is_main and float(sp.n):  # the window is summed over processes when logged: count once
                        for k, v in sp.mean().items():
                            self.window[k] += v * float(sp.n)
                        self.window["sparsity_n"] += float(sp.n)
                for k, v in self.task.metric_sums(outputs[:b], [t[:b] for t in batch]).items():
                    self.window[k] += v
                self.window["n"] += b
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = None
            if cfg.optim.grad_clip:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            if grad_norm is not None and not math.isfinite(grad_norm) and self.scaler is None:
                bar.close()
                raise self.diverged("non-finite gradient norm")
            if self.scaler is not None:  # skips the step when fp16 gradients overflowed, then lowers the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            if self.learned_positions:
                self.model.sheet.constrain_positions()  # fixed_spread: back to the initial spread (else a no-op)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.batch_in_epoch += 1
            dt = time.perf_counter() - t0
            self.train_time += dt
            self.window["time"] += dt
            bar.update(1)
            if self.step % tc.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                world = 1 if self.dist is None else self.dist.world_size
                if self.dist is not None:  # metrics over all ranks' samples
                    keys = self.window_keys
                    total = self.dist.all_reduce_sum(torch.tensor([float(self.window[k]) for k in keys], dtype=torch.float64))
                    self.window.update({k: v for k, v in zip(keys, total.tolist())})
                n = max(1, self.window["n"])
                record = {
                    "type": "step", "step": self.step, "epoch": self.epoch + 1,
                    "loss": self.window["loss"] / n, "task_loss": self.window["task_loss"] / n,
                    "wiring_cost": self.window["wiring_cost"] / n, "attn_entropy": self.window["attn_entropy"] / n,
                    **{k: self.window[k] / n for k in self.extra_keys},
                    **({k: self.window[k] / max(1, self.window["sparsity_n"]) for k in SPARSITY_METRICS}
                       if self.log_sparsity else {}),
                    **self.task.metrics(self.window, n), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "samples_per_s": (n if self.dist is not None else n * world) / max(self.window["time"], 1e-9),
                }
                self._log(record)
                shown = {k: f"{record[k]:.3f}" for k in ("loss", self.task.select[0])}
                bar.set_postfix(**shown, sps=f"{record['samples_per_s']:.0f}")
                self.window = self._empty_window()
            if tc.rewire.every and self.step % tc.rewire.every == 0:
                self.rewire()
            if tc.reconnect_every and self.step % tc.reconnect_every == 0:
                self.reconnect()
            if self.step % tc.ckpt_every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                self.save("last")
        bar.close()
        return True

    def rewire(self) -> int:
        """Replace the weakest edges of the sparse sheet (by mean attention on a few training batches)."""
        from .analysis.connectivity import mean_attention
        from .connectivity import rewire_sheet

        rc = self.cfg.train.rewire
        loader = self._loader("train", batch_size=self.local_batch)
        attn = mean_attention(self.model, loader, self.device, max_batches=rc.batches)  # (T, N, K)
        self.model.train()
        replaced = rewire_sheet(
            self.model.sheet, attn.mean(0), rc.fraction, seed=self.cfg.train.seed * 1_000_003 + self.step,
            optimizer=self.optimizer,
        )
        self._log({"type": "rewire", "step": self.step, "epoch": self.epoch + 1, "edges_replaced": replaced})
        return replaced

    def reconnect(self) -> int:
        """Rebuild the sparse sheet's local edges from its learned positions (``connectivity.reconnect_sheet``)."""
        from .connectivity import reconnect_sheet

        changed = reconnect_sheet(self.model.sheet, self.cfg.model.connectivity.k, optimizer=self.optimizer)
        self._log({"type": "reconnect", "step": self.step, "epoch": self.epoch + 1, "edges_replaced": changed})
        return changed

    def fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        while self.epoch < tc.epochs and self.step < self.total_steps:
            finished = self.train_epoch()
            if not finished:
                break
            val = self._eval_split("val")
            record = {
                "type": "epoch", "epoch": self.epoch + 1, "step": self.step, "train_time_s": self.train_time,
                **{f"val_{k}": v for k, v in val.items()},
            }
            bad = self._bad_images()
            if bad is not None:
                record["bad_images"] = bad
            self._log(record)
            self.epoch += 1
            self.batch_in_epoch = 0
            metric = self.task.select[0]
            if self.task.better(val[metric], self.best_score):
                self.best_score = val[metric]
                self.save("best")
            self.save("last")
        return self.finish(self.wall_time())

    def _write_figures(self, model) -> None:
        """figures/: learning curves, attention vs distance, and the task's own (never loses a finished run)."""
        try:
            from .figures import run_figures

            run_figures(self.run_dir, model, self._loader("val"), self.device)
            self.task.figures(self.run_dir / "figures", model, self.sets["test"], self.device)
        except Exception as exc:  # figures must never lose a finished run
            print(f"warning: figures could not be written: {exc}", file=sys.stderr)

    def wall_time(self) -> float:
        """Seconds of wall time over every segment of the run (a resumed run adds its earlier ones)."""
        return self.wall_before + time.perf_counter() - self.segment_start

    def finish(self, wall_time: float) -> dict[str, Any]:
        """Evaluate the final and the best-on-val model on the test split; write summary.json and figures.

        The headline ``test_*`` numbers are the final model's (the schedule anneals the learning rate
        to ``min_lr_frac``; a small validation split makes picking the best epoch noisy);
        ``best_val_test_<metric>`` is the test value of the task's ``select`` metric (classify: acc)
        for the best-on-validation checkpoint.
        """
        self.wall_before, self.segment_start = wall_time, time.perf_counter()  # the checkpoint keeps this total
        self.save("last")
        final_test = self._eval_split("test")
        best_path = self.ckpt_dir / "best.pt"
        best_test = final_test
        if best_path.exists():
            self._load_model(load_checkpoint(best_path)["model"], str(best_path))
            best_test = self._eval_split("test")
        trained = self.step * self.cfg.train.batch_size * self.cfg.optim.accum_steps
        metric = self.task.select[0]
        summary = {
            "name": self.cfg.name,
            "preset": self.cfg.preset,
            "task": self.task.name,
            "num_params": self.num_params,
            "steps": self.step,
            "epochs": self.epoch,
            f"best_val_{metric}": self.best_score,
            **{f"test_{k}": v for k, v in final_test.items() if k != "n"},
            f"best_val_test_{metric}": best_test[metric],
            "train_time_s": self.train_time,
            "wall_time_s": wall_time,
            "train_samples_per_s": trained / max(self.train_time, 1e-9),
            "world_size": self.world_size,
            "precision": self.cfg.train.precision,
        }
        if self.init_report is not None:
            summary["init_from"] = self.init_report
        bad = self._bad_images()
        if bad is not None:
            summary["bad_images"] = bad
        figure_model = self.model
        if self._sharded:  # figures run on rank 0 alone: give it an unsharded copy (gathering is collective)
            full = self.dist.model_state_dict(self.model)
            if self.is_main:
                figure_model = self.task.build_model().to(self.device)
                figure_model.load_state_dict(full)
        if self.is_main:
            baseline = self.task.baseline(self.data_sets)
            if baseline is not None:
                summary["baseline"] = baseline
            write_json(summary, self.run_dir / "summary.json")
            if self.cfg.train.figures:
                self._write_figures(figure_model)
            self.trackers.log({"type": "summary", "step": self.step, **{k: v for k, v in summary.items() if k != "baseline"}})
            self.trackers.close()
        return summary


def run_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def train(cfg: RunConfig, overwrite: bool = False, dist=None) -> dict[str, Any]:
    """Start a new run in ``out_dir/name`` and train it to the end."""
    run_dir = run_dir_for(cfg)
    with _writer_lock(run_dir, dist):
        return _train(cfg, run_dir, overwrite, dist)


def _writer_lock(run_dir: Path, dist):
    """The run directory's lock, held by the process that writes it (rank 0 under torchrun)."""
    return run_lock(run_dir) if dist is None or dist.rank == 0 else nullcontext()


def _train(cfg: RunConfig, run_dir: Path, overwrite: bool, dist) -> dict[str, Any]:
    if (run_dir / "checkpoints").exists() and (dist is None or dist.rank == 0):
        if not overwrite:
            raise RunExistsError(
                f"run directory {str(run_dir)!r} already holds a run; resume it with `columnformer resume {run_dir}`, "
                "pick another name (name=...), or pass --overwrite"
            )
        remove_run(run_dir)  # only what a run wrote; a folder that is not a run is refused
    if dist is not None:
        dist.barrier()
    return Trainer(cfg, run_dir, dist=dist).fit()


def resume(run_dir: str | Path, dist=None, extend: int | None = None) -> dict[str, Any]:
    """Continue a run from ``checkpoints/last.pt`` with the config stored in the run directory."""
    from .run import read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    with _writer_lock(run_dir, dist):
        if not (run_dir / "checkpoints" / "last.pt").exists() and extend is None:
            # stopped before its first checkpoint was complete: nothing to continue, so start it again (the same
            # batches and result as an uninterrupted run)
            if dist is None or dist.rank == 0:
                print(f"resume: {run_dir} has no checkpoint yet; starting it from the beginning", file=sys.stderr)
                remove_run(run_dir)
            if dist is not None:
                dist.barrier()
            return Trainer(cfg, run_dir, dist=dist).fit()
        if extend is not None:  # train on to `extend` epochs; the cosine schedule is re-planned over the new total
            if extend <= cfg.train.epochs:
                raise ConfigError(f"--extend {extend} must exceed the run's train.epochs ({cfg.train.epochs})")
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": extend})})
        trainer = Trainer(cfg, run_dir, resume=True, dist=dist, extending=extend is not None)
        if extend is not None:  # the checkpoint first (it then holds the new epochs), then config.yaml
            trainer.save("last")
            if dist is None or dist.rank == 0:
                write_config(cfg, run_dir / "config.yaml")
        if trainer.epoch >= cfg.train.epochs or trainer.step >= trainer.total_steps:
            return trainer.finish(trainer.wall_before)  # already finished: re-evaluate, keep its wall time
        return trainer.fit()
