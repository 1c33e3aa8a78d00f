"""Stage two's training as torch ``DistributedDataParallel`` processes (one per GPU; gloo on CPU), each on its
shard of the single-process run's batches: the same updates up to rounding (see :func:`train_network_replicas`).
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from semisam_o1.stage_two.loop import _prepare, _train_loop
from semisam_o1.stage_two.params import TrainParams


def train_processes(params: TrainParams, device: str = "cpu") -> int:
    """How many processes :func:`train_network` trains with: ``params.processes``, or when None on CUDA the most
    visible GPUs that divide ``params.batch_size``, else 1.

    Raises ValueError when ``params.batch_size`` is not a multiple of it, when it is below 1, when it asks for
    more CUDA processes than visible GPUs, or for more than one process on a device other than CPU or CUDA.
    """
    kind = torch.device(device).type
    processes = params.processes
    if processes is None:  # the most GPUs that split the batch evenly
        gpus = torch.cuda.device_count() if kind == "cuda" else 1
        processes = max(n for n in range(1, max(1, gpus) + 1) if params.batch_size % n == 0)
    if processes < 1:
        raise ValueError(f"train_processes must be at least 1, got {processes}")
    if params.batch_size % processes:
        raise ValueError(f"batch_size {params.batch_size} is not a multiple of train_processes {processes}: "
                         "each process trains on an equal share of every batch")
    if processes > 1 and kind not in ("cpu", "cuda"):
        raise ValueError(f"train_processes {processes} > 1 needs device cpu or cuda, not {device}")
    if processes > 1 and kind == "cuda" and processes > torch.cuda.device_count():
        raise ValueError(f"train_processes {processes} > the {torch.cuda.device_count()} visible CUDA GPUs (one process per GPU)")
    return processes


def train_network_replicas(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_classes: int,
    params: TrainParams = TrainParams(),
    on_iteration: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    processes: int | None = None,
    weights: Sequence[float] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train as ``processes`` (default :func:`train_processes`) DistributedDataParallel processes; every
    replica's final ``state_dict`` (CPU tensors), rank 0's first. Identical replicas are what DDP guarantees;
    this does not check it (:func:`train_network` does).

    Every rank builds the data pipeline and network exactly as one process does (same seeds, same order), so
    each step every rank draws the same batch of n <= ``batch_size`` patches (n < ``batch_size`` at the end
    of an epoch) and rank r trains on rows ``r::processes``. Its loss is weighted by
    ``processes * rows / n``, so DDP's gradient average is the gradient of the whole batch's loss (Dice + CE
    are means over equal-sized patches); a rank left without rows trains on row 0 with weight 0. Dropout
    masks are drawn for the whole batch on every rank and sliced, so on the CPU each row gets the mask it
    gets in one process. The network has instance norm only (no batch statistics; BatchNorm would be
    synchronised). Processes are spawned: gloo on the CPU, nccl on CUDA with rank r on ``cuda:r``; each uses
    ``cpu_count // processes`` threads. Memory-mapped arrays (``np.memmap``, ``np.load(..., mmap_mode="r")``
    and contiguous views of them) are reopened from their file in each process, other arrays are pickled.

    Args:
        on_iteration: called in this process as ``on_iteration(iteration, loss)`` for every step while the
            processes run, ``loss`` the whole batch's (averaged over the processes).
        weights, init: per-case sampling weights and starting weights, as in :func:`train_network`.
    Raises:
        RuntimeError: a process failed (its error in the message); the others are stopped.
    """
    processes = train_processes(params if processes is None else replace(params, processes=processes), device)
    kind = torch.device(device).type
    from torch.multiprocessing.spawn import ProcessException

    from semisam_o1.distributed import free_port

    context = torch.multiprocessing.get_context("spawn")
    progress = context.Queue()
    out_dir = Path(tempfile.mkdtemp(prefix="semisam-ddp-"))
    data = ([_shareable(a) for a in images], [_shareable(a) for a in labels])
    args = (processes, f"tcp://127.0.0.1:{free_port()}", data, n_classes, params, kind, progress, str(out_dir), weights, init)
    ranks = None
    try:
        ranks = torch.multiprocessing.start_processes(_train_rank, args=args, nprocs=processes, join=False, start_method="spawn")
        done = False
        while not done:
            try:
                done = ranks.join(timeout=0.1)
            except ProcessException as e:
                raise RuntimeError(f"DDP training process {e.error_index} failed: {e}") from e
            while True:  # after join: everything the ranks put is in the pipe
                try:
                    iteration, loss = progress.get_nowait()
                except queue_module.Empty:
                    break
                if on_iteration is not None:
                    on_iteration(iteration, loss)
        return [torch.load(out_dir / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(processes)]
    finally:
        for process in ranks.processes if ranks is not None else []:
            if process.is_alive():
                process.terminate()
            process.join()
        progress.close()
        shutil.rmtree(out_dir, ignore_errors=True)


class _Rows:
    """This process's share of the current batch: ``n`` rows in all, ``index`` (a slice or list) its own."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.n, self.index = rank, world, 0, slice(None)


class _RowsDropout(torch.nn.Module):
    """``nn.Dropout(p)`` for this process's rows of a batch: the mask is drawn for the whole batch (``rows.n``
    rows, from torch's global generator, as ``nn.Dropout`` does on the CPU) and this process's rows taken."""

    def __init__(self, p: float, rows: _Rows):
        super().__init__()
        self.p, self.rows = p, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        noise = torch.empty((self.rows.n, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)[self.rows.index]


def _train_rank(rank: int, world: int, init_method: str, data, n_classes: int, params: TrainParams, kind: str,
                progress, out_dir: str, weights: Sequence[float] | None = None,
                init: Mapping[str, torch.Tensor] | None = None) -> None:
    """One DDP process (started by :func:`train_network_replicas`): trains, writes ``out_dir/rank{rank}.pt``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = f"cuda:{rank}" if kind == "cuda" else "cpu"
    if kind == "cuda":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if kind == "cuda" else "gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        images, labels = ([_reopen(a) for a in arrays] for arrays in data)
        loader, net = _prepare(images, labels, n_classes, params, weights, init)
        rows = _Rows(rank, world)
        for name, module in list(net.named_modules()):
            if type(module) is torch.nn.Dropout:
                parent, _, attr = name.rpartition(".")
                setattr(net.get_submodule(parent), attr, _RowsDropout(module.p, rows))
            elif isinstance(module, torch.nn.modules.dropout._DropoutNd):
                raise TypeError(f"DDP training: {type(module).__name__} is not supported (use nn.Dropout)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net.to(device))  # no-op: the UNet has instance norm
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rank] if kind == "cuda" else None)
        report = (lambda iteration, loss: progress.put((iteration, loss))) if rank == 0 else None
        _train_loop(ddp, loader, params, device, report, rows)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _shareable(array: np.ndarray):
    """``array`` as sent to a training process: ``("memmap", filename, dtype, shape, offset, order)`` when it is a
    C- or F-contiguous view of a file-backed ``np.memmap`` (nothing copied), else the array itself (pickled)."""
    root = array
    while isinstance(root, np.ndarray) and not (isinstance(root, np.memmap) and not isinstance(root.base, np.ndarray)):
        root = root.base
    if not isinstance(root, np.memmap) or getattr(root, "filename", None) is None or root.size == 0:
        return np.asarray(array)
    order = "C" if array.flags.c_contiguous else "F" if array.flags.f_contiguous else None
    if order is None:
        return np.ascontiguousarray(array)
    offset = root.offset + (array.__array_interface__["data"][0] - root.__array_interface__["data"][0])
    return ("memmap", os.fspath(root.filename), array.dtype, array.shape, offset, order)


def _reopen(shared) -> np.ndarray:
    """What :func:`_shareable` sent, as an array (a read-only ``np.memmap`` for a memory-mapped one)."""
    if isinstance(shared, tuple):
        _, filename, dtype, shape, offset, order = shared
        return np.memmap(filename, dtype=dtype, mode="r", shape=tuple(shape), offset=offset, order=order)
    return shared
