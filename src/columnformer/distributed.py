"""Multi-process training under ``torchrun`` (one node or many): process group, model wrapping, state dicts.

    torchrun --nproc_per_node=8 -m columnformer train --config cfg.yaml              # one node, DDP
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m columnformer train --config cfg.yaml train.parallel=fsdp                  # two nodes, FSDP2

``cli`` calls :func:`init_distributed` when ``WORLD_SIZE > 1``; the returned :class:`Distributed`
is what the :class:`~columnformer.train.Trainer` uses (``rank``, ``world_size``, ``device``,
``wrap``, ``no_sync``, ``barrier``, ``all_reduce_*`` and the full-state-dict helpers).

* Backend: nccl when the device is CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
* ``train.parallel=ddp`` (default): ``DistributedDataParallel``; gradients are averaged over ranks.
* ``train.parallel=fsdp``: FSDP2 ``torch.distributed.fsdp.fully_shard`` (each block of a feed-forward
  sheet is its own shard group, then the root); parameters, gradients and optimizer state are sharded.
  Checkpoints hold *full* state dicts gathered with ``torch.distributed.checkpoint.state_dict``
  (``full_state_dict=True, cpu_offload=True``), written by rank 0, so a checkpoint looks the same
  whatever the parallel mode (``load_run`` reads it on one CPU).
* Every rank reads checkpoints from the run directory on resume: with several nodes, put ``out_dir``
  on a file system that all nodes share.
* Gradient equivalence: the global batch ``train.batch_size`` is split evenly over ranks and the loss
  is normalised by the *global* number of samples of each batch, so a run on W processes takes the
  same optimizer steps as one process (up to float summation order), including the last, smaller
  batch of an epoch (see ``Trainer.train_epoch``).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The process group cannot be set up or a parallel mode is not usable here."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set; launch with torchrun")
        return default
    return int(value)


class Distributed:
    """One rank's view of the process group."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, parallel: str = "ddp"):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.parallel = device, parallel
        self.backend = dist.get_backend() if dist.is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def __repr__(self) -> str:
        return (f"Distributed(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device}, backend={self.backend}, parallel={self.parallel})")

    # -------------------------------------------------------------- model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP wrapper (returned; ``model`` stays the plain module) or FSDP2 in place (returns ``model``)."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # pragma: no cover - torch < 2.6
            raise DistributedError(
                f"train.parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch>=2.6); torch {torch.__version__}"
            ) from None
        sheet = getattr(model, "sheet", None)
        blocks = getattr(sheet, "blocks", None)
        # a recurrent sheet runs its one block T times per forward: keep it in the root group
        if blocks is not None and len(blocks) > 1 and not getattr(getattr(sheet, "cfg", None), "recurrent", True):
            for block in blocks:
                fully_shard(block)
        fully_shard(model)
        return model

    def no_sync(self, module: torch.nn.Module):
        """Skip the gradient all-reduce for a micro-batch of gradient accumulation."""
        if self.parallel == "ddp":
            return module.no_sync()
        return self._fsdp_no_sync(module)

    @staticmethod
    @contextmanager
    def _fsdp_no_sync(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    # -------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a new tensor on the tensor's original device)."""
        t = tensor.detach().to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor.float()) / self.world_size

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    # -------------------------------------------------------------- state dicts
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state; under FSDP a collective, complete on rank 0 only."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict into a (possibly sharded) model; every rank passes the full state."""
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=self._options())

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=self._options())

    def shutdown(self) -> None:
        """Leave together: free what still holds communication state (a finished trainer's sharded modules sit in
        reference cycles), wait for every rank, then destroy the process groups while the interpreter is whole."""
        if dist.is_initialized():
            gc.collect()
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def init_distributed(cfg) -> Distributed:
    """Join the process group that ``torchrun`` set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    tc = cfg.train
    want = tc.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"train.device={tc.device!r} but CUDA is not available; use train.device=cpu (gloo)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if tc.parallel == "fsdp" and tc.rewire.every:
        raise DistributedError("train.rewire.every is not supported with train.parallel=fsdp (sharded parameters); use ddp")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    if dist.get_world_size() != world or dist.get_rank() != rank:  # pragma: no cover - inconsistent env
        raise DistributedError(f"process group (rank {dist.get_rank()}/{dist.get_world_size()}) does not match RANK/WORLD_SIZE")
    ctx = Distributed(rank, world, local_rank, device, tc.parallel)
    atexit.register(_destroy)
    return ctx


def _destroy() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
