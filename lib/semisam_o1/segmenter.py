"""Stage two's 3D network: trained on (pseudo-)labels from scratch or from given weights, predicting with voxel-wise
uncertainty.

- :func:`build_network`: MONAI ``UNet`` with dropout (dropout also drives MC-dropout uncertainty).
- :func:`train_network`: patches read straight from (memory-mapped) volumes by :class:`PatchSampler`
  (2 of 3 centred on foreground), MONAI dictionary transforms on each patch (flips, intensity jitter;
  with ``TrainParams.augment="affine"`` also random rotation and scaling, :func:`augmentation`),
  Dice + cross-entropy loss, Adam; a fixed number of iterations, sized for CPU. Only the patches are
  ever in memory, so the pool may be ``np.load(..., mmap_mode="r")`` arrays of any size.
  With ``TrainParams.processes`` > 1 it trains as torch ``DistributedDataParallel`` processes (one per GPU,
  gloo on CPU), each on its shard of the single-process run's batches: the same updates up to rounding.
- :func:`predict_with_uncertainty`: MONAI sliding-window inference averaged over flips (TTA) and
  MC-dropout passes; returns the mean softmax and its entropy.

Volumes are ``(D, H, W)`` float32 in [0, 1] (already normalised); labels ``(D, H, W)`` int.
"""

from __future__ import annotations

import copy
import math
import os
import queue as queue_module
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from torch.utils.data import WeightedRandomSampler

from semisam_o1.choices import AUGMENTATIONS

#: ``augment="affine"``: each patch is rotated about each axis (in-plane only on thick slices) by up to this many
#: degrees and scaled by up to this fraction (1 +/- 0.15), with probability :data:`AFFINE_PROB`
ROTATE_DEGREES, SCALE, AFFINE_PROB = 15.0, 0.15, 0.5
#: ``augment="affine"``: patches are read this much larger than ``TrainParams.patch`` and the affine resamples the
#: centre at the patch size, so rotated and shrunk patches show anatomy in their corners, not padding
AFFINE_MARGIN = 1.5


@dataclass(frozen=True)
class TrainParams:
    """Training budget and shapes (defaults sized for 2 CPU cores and hippocampus-sized volumes)."""

    patch: tuple[int, int, int] = (32, 32, 32)
    #: Adam steps (``None`` only in :class:`~semisam_o1.stage_two.StageTwoParams`: the plan's, see there)
    iterations: int | None = 1000
    batch_size: int = 4
    learning_rate: float = 3e-3
    #: (8, ..., 64) trains 1.5x faster than (16, ..., 128) at the same Dice on hippocampus
    #: (full supervision, 30 volumes, 1000 iterations: 0.811 vs 0.807).
    channels: tuple[int, ...] = (8, 16, 32, 64)
    dropout: float = 0.1
    seed: int = 0
    #: spatial axes (of D, H, W) that training augmentation mirrors and prediction averages over (TTA);
    #: an axis along which the labels come in mirror pairs (left/right kidney) must be left out, see
    #: :func:`mirror_axes`
    flip_axes: tuple[int, ...] = (0, 1, 2)
    #: one of :data:`~semisam_o1.choices.AUGMENTATIONS`: "flip" (mirroring along ``flip_axes`` and intensity
    #: jitter) or "affine" (and random rotation and scaling, :func:`augmentation`)
    augment: str = "flip"
    #: with ``augment="affine"``: the thick-slice axis of the network's grid (of D, H, W), or None on a near-isotropic
    #: grid; with a slice axis patches are rotated about it and scaled along the other two only, so slices never mix
    #: (:func:`slice_axis`)
    slice_axis: int | None = None
    #: Training processes (torch DistributedDataParallel, see :func:`train_network`); None = auto: on CUDA the
    #: most visible GPUs that divide ``batch_size`` (one process each), else 1. ``batch_size`` must be a multiple of it.
    processes: int | None = None


def build_network(n_classes: int, params: TrainParams = TrainParams()) -> UNet:
    """UNet: (B, 1, D, H, W) -> (B, n_classes, D, H, W) logits (n_classes includes background)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=n_classes,
        channels=params.channels,
        strides=(2,) * (len(params.channels) - 1),
        num_res_units=2,
        dropout=params.dropout,
    )


def save_network(net: UNet, n_classes: int, path: Path, params: TrainParams = TrainParams(), grid_voxels: int | None = None) -> Path:
    """Checkpoint that describes itself: ``{"n_classes", "channels", "dropout", "grid_voxels", "flip_axes", "state_dict"}``
    (written atomically). ``grid_voxels``: the voxel limit of the grid the network was trained on
    (:func:`~semisam_o1.plan.shrink_factors`; ``None``: each image's own grid), so it predicts on the same one."""
    from semisam_o1.volumes import atomic_write

    payload = {"n_classes": n_classes, "channels": list(params.channels), "dropout": params.dropout, "grid_voxels": grid_voxels,
               "flip_axes": list(params.flip_axes), "state_dict": net.state_dict()}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_network(path: Path) -> UNet:
    """A network saved by :func:`save_network` (its own architecture), in eval mode on CPU; its attribute
    ``grid_voxels`` is the checkpoint's (``None`` for checkpoints written before it was recorded: image grids),
    ``flip_axes`` the axes it was trained to be mirrored along (older checkpoints: all three)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # checkpoints written before the architecture was recorded used the then default (16, ..., 128), dropout 0.1
    params = TrainParams(channels=tuple(payload.get("channels", (16, 32, 64, 128))), dropout=float(payload.get("dropout", 0.1)))
    net = build_network(int(payload["n_classes"]), params)
    net.load_state_dict(payload["state_dict"])
    net.grid_voxels = payload.get("grid_voxels")
    net.flip_axes = tuple(payload.get("flip_axes", (0, 1, 2)))
    return net.eval()


class PatchSampler(Sequence):
    """One random training patch per case and access: ``{"image": (1, *patch) float32, "label": (1, *patch) uint8}``.

    What MONAI's ``SpatialPadd`` + ``RandCropByPosNegLabeld(pos=2, neg=1)`` do, reading only the patch:
    MONAI's crop first turns the whole volume into a tensor, i.e. the whole pool into memory, once per
    step. A patch is centred on a foreground voxel (label > 0) with probability ``pos / (pos + neg)``,
    else on a background voxel, moved so that it lies inside the volume; a volume smaller than the patch
    is zero-padded evenly on both sides. Candidate centres: a uniform sample of at most ``max_points``
    foreground and as many background voxels per case, found slab by slab (never a whole-volume copy).
    With ``context`` (voxels per side and axis) the patch comes with that much of its surroundings, zero
    outside the volume: ``patch + 2 * context`` voxels whose centre is exactly the patch it would be without
    (what ``augment="affine"`` rotates and scales about).

    Args:
        images: (D, H, W) arrays in [0, 1] (``np.memmap`` welcome); labels: (D, H, W) integer arrays.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch: Sequence[int],
                 pos: int = 2, neg: int = 1, seed: int = 0, max_points: int = 20000, context: Sequence[int] = (0, 0, 0)):
        self.images, self.labels, self.patch = list(images), list(labels), tuple(int(p) for p in patch)
        self.context = tuple(int(m) for m in context)
        self.p_pos = pos / (pos + neg)
        self.rng = np.random.default_rng(seed)
        self.points = [self._centres(lab, max_points) for lab in self.labels]

    def __len__(self) -> int:
        return len(self.images)

    def _centres(self, label: np.ndarray, max_points: int, slab: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, background) flat voxel indices, each a uniform sample of at most ``max_points``."""
        counts = [int(np.count_nonzero(label[z:z + slab])) for z in range(0, label.shape[0], slab)]
        n_fg, n_bg = sum(counts), label.size - sum(counts)
        rates = (min(1.0, max_points / max(1, n_fg)), min(1.0, max_points / max(1, n_bg)))
        fg, bg, per_slab = [], [], int(np.prod(label.shape[1:]))
        for z in range(0, label.shape[0], slab):
            flat = np.asarray(label[z:z + slab]).reshape(-1) > 0
            for out, where, rate in ((fg, flat, rates[0]), (bg, ~flat, rates[1])):
                idx = np.flatnonzero(where)
                out.append(idx[self.rng.random(len(idx)) < rate] + z * per_slab)
        return np.concatenate(fg), np.concatenate(bg)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image, label = self.images[i], self.labels[i]
        fg, bg = self.points[i]
        pool = fg if (len(fg) and self.rng.random() < self.p_pos) or not len(bg) else bg
        centre = np.unravel_index(int(pool[self.rng.integers(len(pool))]), label.shape)
        # the patch's first voxel per axis: inside the volume, or (volume smaller than the patch) centred on it
        start = [min(max(c - p // 2, 0), n - p) if n >= p else -((p - n) // 2) for c, p, n in zip(centre, self.patch, label.shape)]
        lo = [s - m for s, m in zip(start, self.context)]
        hi = [s + p + m for s, p, m in zip(start, self.patch, self.context)]
        box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, label.shape))
        x, y = np.asarray(image[box], np.float32), np.asarray(label[box], np.uint8)
        pad = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, label.shape)]
        if any(sum(w) for w in pad):
            x, y = np.pad(x, pad), np.pad(y, pad)
        return {"image": x[None], "label": y[None]}


def train_network(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_classes: int,
    params: TrainParams = TrainParams(),
    on_iteration: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    weights: Sequence[float] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> UNet:
    """Train a network on ``images`` (each (D, H, W) in [0, 1]) and ``labels`` (each (D, H, W) int).

    With :func:`train_processes` = 1 it trains in this process (reproducible bit for bit for a given
    ``params.seed`` on the CPU). With N > 1 it trains as N DistributedDataParallel processes
    (:func:`train_network_replicas`), checks that every replica ended with the same weights (else
    ``RuntimeError("DDP replicas diverged ...")``) and returns rank 0's: the same network as one process
    would train, up to float rounding.

    Args:
        on_iteration: called as ``on_iteration(iteration, loss)`` after every step (progress, stats), in
            this process; ``loss`` is the loss of the whole batch (averaged over the processes).
        device: where the network trains (patches are cropped on the CPU); it is returned on the CPU, in eval mode,
            with ``flip_axes`` set to ``params.flip_axes`` (what :func:`predict_with_uncertainty` mirrors along).
        weights: how often each case gives a training patch, relative to the others (drawn with replacement,
            :class:`torch.utils.data.WeightedRandomSampler`); ``None``: every case once per epoch, shuffled.
            E.g. ``[1, 1, 1]`` + 30 x ``[0.1]``: half the patches come from the first three cases.
        init: the weights to start from (a ``state_dict`` of a network of the same architecture, e.g. the previous
            round's); ``None``: a fresh network (seeded by ``params.seed``). Either way the full learning-rate
            schedule runs.
    """
    processes = train_processes(params, device)
    if processes == 1:
        loader, net = _prepare(images, labels, n_classes, params, weights, init)
        _train_loop(net.to(device), loader, params, device, on_iteration)
        net.eval()
        net.flip_axes = params.flip_axes  # what its prediction mirrors along (as load_network reads it)
        return net.cpu()
    replicas = train_network_replicas(images, labels, n_classes, params, on_iteration, device, processes, weights, init)
    for rank, replica in enumerate(replicas[1:], 1):
        if replica.keys() != replicas[0].keys() or not all(torch.equal(replica[k], replicas[0][k]) for k in replica):
            raise RuntimeError(f"DDP replicas diverged: rank {rank}'s weights differ from rank 0's")
    net = build_network(n_classes, params)
    net.load_state_dict(replicas[0])
    net.flip_axes = params.flip_axes
    return net.eval()


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


def augmentation(params: TrainParams) -> Compose:
    """The random transforms of every training patch ``{"image": (1, D, H, W) float32, "label": (1, D, H, W)}``.

    ``augment="flip"``: mirroring along each of ``params.flip_axes`` (probability 0.5 each) and intensity
    scaling and shifting (+/- 0.1, probability 0.5 each); the patch keeps its size. ``augment="affine"``: first,
    with probability :data:`AFFINE_PROB`, a rotation by up to :data:`ROTATE_DEGREES` about each axis and a
    scaling by 1 +/- :data:`SCALE` along each axis (with ``params.slice_axis``: rotation about that axis only and
    scaling along the other two, so each output slice is one input slice), MONAI ``RandAffined`` (image
    trilinear, label nearest, zeros outside) resampling the centre at ``params.patch``'s size: the patches it gets
    come with :func:`patch_context` around them (:func:`sampled_patch` in all), and without the affine the patch
    itself is cut out unchanged. Label values are never interpolated.

    >>> params = TrainParams(augment="affine")
    >>> patch = {"image": np.zeros((1, *sampled_patch(params)), np.float32), "label": np.zeros((1, *sampled_patch(params)), np.uint8)}
    >>> sampled_patch(params), tuple(augmentation(params)(patch)["label"].shape)
    ((48, 48, 48), (1, 32, 32, 32))
    """
    if params.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {params.augment!r}")
    keys = ["image", "label"]
    spatial = []
    if params.augment == "affine":
        turn, axis = math.radians(ROTATE_DEGREES), params.slice_axis
        rotate = [turn if axis is None or a == axis else 0.0 for a in range(3)]
        scale = [SCALE if axis is None or a != axis else 0.0 for a in range(3)]
        spatial.append(RandAffined(keys, spatial_size=params.patch, prob=AFFINE_PROB, mode=("bilinear", "nearest"), padding_mode="zeros",
                                   rotate_range=rotate, scale_range=scale))
    transform = Compose(
        [
            *spatial,
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in params.flip_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    transform.set_random_state(seed=params.seed)
    return transform


def patch_context(params: TrainParams) -> tuple[int, ...]:
    """Voxels of surroundings read on each side of a training patch: none, or with ``augment="affine"`` enough
    for a patch :data:`AFFINE_MARGIN` x as large (8 per side of a 32-voxel patch)."""
    if params.augment != "affine":
        return (0,) * len(params.patch)
    return tuple(int(math.ceil(p * (AFFINE_MARGIN - 1) / 2)) for p in params.patch)


def sampled_patch(params: TrainParams) -> tuple[int, ...]:
    """The size training patches are read at, :func:`augmentation`'s input: ``params.patch`` plus
    :func:`patch_context` on both sides."""
    return tuple(p + 2 * m for p, m in zip(params.patch, patch_context(params)))


def slice_axis(spacing: Sequence[float], anisotropy: float = 2.0) -> int | None:
    """The thick-slice axis of a grid with voxel ``spacing`` (mm, per axis of D, H, W): its coarsest axis when that is
    more than ``anisotropy`` x its finest, else None (near-isotropic). ``augment="affine"`` rotates and scales only in
    the plane of the other two axes there (as nnU-Net does for anisotropic data).

    >>> slice_axis((1.0, 1.0, 1.0)), slice_axis((7.7, 2.5, 2.5)), slice_axis((1.25, 1.25, 2.0))
    (None, 0, None)
    """
    spacing = [float(s) for s in spacing]
    return int(np.argmax(spacing)) if max(spacing) > anisotropy * min(spacing) else None


def _prepare(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_classes: int, params: TrainParams,
             weights: Sequence[float] | None = None, init: Mapping[str, torch.Tensor] | None = None) -> tuple[DataLoader, UNet]:
    """The seeded batches and network of one training run (identical wherever it runs); ``weights``:
    per-case sampling weights, ``init``: starting weights, else a fresh network (see :func:`train_network`)."""
    torch.manual_seed(params.seed)
    transform = augmentation(params)
    patches = PatchSampler(images, labels, params.patch, seed=params.seed, context=patch_context(params))
    generator = torch.Generator().manual_seed(params.seed)
    if weights is None:
        order = {"shuffle": True, "generator": generator}
    else:
        if len(weights) != len(patches) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights: {len(patches)} non-negative numbers with a positive sum needed, got {list(weights)}")
        order = {"sampler": WeightedRandomSampler([float(w) for w in weights], len(patches), replacement=True, generator=generator)}
    loader = DataLoader(Dataset(patches, transform), batch_size=params.batch_size, num_workers=0, **order)
    net = build_network(n_classes, params)
    if init is not None:
        net.load_state_dict(init)
    return loader, net


class _Rows:
    """This process's share of the current batch: ``n`` rows in all, ``index`` (a slice or list) its own."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.n, self.index = rank, world, 0, slice(None)


def _train_loop(net: torch.nn.Module, loader: DataLoader, params: TrainParams, device: str,
                on_iteration: Callable[[int, float], None] | None, rows: _Rows | None = None) -> None:
    """``params.iterations`` Adam steps (cosine-decayed learning rate) of Dice + CE on ``loader``'s batches.

    ``rows`` None: ``net`` trains on whole batches. Else ``net`` is a DistributedDataParallel replica (its
    dropout layers :class:`_RowsDropout` reading ``rows``) training on rows ``rows.rank::rows.world`` of each
    batch, loss weighted so the averaged gradient is the whole batch's; ``on_iteration`` then gets the whole
    batch's loss (all-reduced).
    """
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / params.iterations)))
    net.train()
    iteration = 0
    while iteration < params.iterations:
        for batch in loader:
            optimizer.zero_grad()
            image, label = batch["image"], batch["label"]
            if rows is None:
                loss = loss_fn(net(image.to(device)), label.to(device).long())
                loss.backward()
                reported = loss.detach().item()
            else:
                rows.n = len(image)
                own = list(range(rows.rank, rows.n, rows.world))
                rows.index = own or [0]
                share = len(own) / rows.n  # this rank's share of the whole batch's loss
                loss = loss_fn(net(image[rows.index].to(device)), label[rows.index].to(device).long())
                (loss * (share * rows.world)).backward()  # DDP averages over the world
                total = (loss.detach() * share).reshape(1)
                torch.distributed.all_reduce(total)
                reported = total.item()
            optimizer.step()
            scheduler.step()
            iteration += 1
            if on_iteration is not None:
                on_iteration(iteration, reported)
            if iteration >= params.iterations:
                break


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


@torch.no_grad()
def predict_with_uncertainty(net: UNet, image: np.ndarray, patch: Sequence[int], mc_samples: int = 2, flips: bool = True,
                             device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean softmax (C, D, H, W) float32 and its entropy (D, H, W) float32 in nats, over flips x MC-dropout passes.

    Flips: none, and one mirror along each of the network's ``flip_axes`` (the axes it was trained to be
    mirrored along; all three for a network without the attribute); ``flips=False``: none.

    With ``mc_samples`` = 0 dropout stays off (deterministic, one pass per flip). MC-dropout pass
    ``s`` draws its masks from a local generator seeded with ``s`` (reproducible). Nothing outside
    the call changes: not ``net`` (dropout is switched on a copy when needed, so concurrent requests
    sharing one model never see each other's mode), not torch's global random state. Patches run on
    ``device``; the volume and the stitched output stay on the CPU (any volume size fits the GPU).

    Memory (CPU, ``V`` voxels, ``C`` classes, float32): besides ``image``, the running sum (``C V``),
    one pass's stitched logits (``C V``, turned into probabilities in place) and the flipped input
    (``V``); the entropy is summed class by class.
    """
    net = net.to(device)
    x = torch.as_tensor(image, dtype=torch.float32)[None, None]
    flip_sets = [(), *((axis + 2,) for axis in getattr(net, "flip_axes", (0, 1, 2)))] if flips else [()]
    passes = max(mc_samples, 1)
    generator = torch.Generator(device=torch.device(device))
    model = _with_dropout(net, generator if mc_samples > 0 else None)
    total = None
    for dims in flip_sets:
        for sample in range(passes):
            generator.manual_seed(sample)
            xi = torch.flip(x, dims) if dims else x
            prob = sliding_window_inference(xi, roi_size=tuple(patch), sw_batch_size=4, predictor=model, overlap=0.25, mode="gaussian",
                                            sw_device=device, device="cpu")[0].numpy()
            del xi
            _softmax_(prob)
            prob = np.flip(prob, [d - 1 for d in dims]) if dims else prob  # a view: added below without a copy
            if total is None:
                total = np.ascontiguousarray(prob)
            else:
                total += prob
            del prob
    total /= len(flip_sets) * passes
    return total, entropy(total)


def _softmax_(logits: np.ndarray) -> None:
    """Softmax over axis 0 of ``(C, ...)`` float32 ``logits``, in place (one ``(...)`` temporary at a time)."""
    top = logits.max(0)
    logits -= top
    np.exp(logits, out=logits)
    np.sum(logits, 0, out=top)
    logits /= top


def entropy(prob: np.ndarray) -> np.ndarray:
    """Entropy (D, H, W) float32 in nats of class probabilities ``prob`` (C, D, H, W), summed class by class."""
    out = np.zeros(prob.shape[1:], np.float32)
    term = np.empty_like(out)
    for p in prob:
        np.clip(p, 1e-8, None, out=term)
        np.log(term, out=term)
        term *= p
        out -= term
    return out


def mirror_axes(labels: Sequence[np.ndarray], n_classes: int) -> tuple[int, ...]:
    """The spatial axes along which mirroring keeps every class on itself in every label map (D, H, W).

    Along an axis where a class's mirror image lands more on another foreground class than on itself
    (left/right kidney, hippocampus head/tail along its long axis), a mirrored patch shows one class in the
    shape of the other: flipping there in training or TTA teaches and averages the wrong class.

    >>> pair = np.zeros((1, 1, 8), np.uint8); pair[..., 1:3], pair[..., 5:7] = 1, 2  # a left and a right class
    >>> mirror_axes([pair], 3)
    (0, 1)
    """
    keep = []
    for axis in range(3):
        ok = True
        for label in labels:
            label = np.asarray(label)
            mirrored = np.flip(label, axis)
            overlap = np.bincount((mirrored.astype(np.int64) * n_classes + label).ravel(), minlength=n_classes * n_classes)
            overlap = overlap.reshape(n_classes, n_classes)  # [class mirrored, class there]
            for c in range(1, n_classes):
                others = max((overlap[c, d] for d in range(1, n_classes) if d != c), default=0)
                ok &= not (overlap[c].sum() and others > overlap[c, c])
        if ok:
            keep.append(axis)
    return tuple(keep)


def shrunk_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """The shape of a grid shrunk by integer ``factors``: ``ceil(n / f)`` per axis.

    >>> shrunk_shape((183, 140, 88), (2, 2, 2))
    (92, 70, 44)
    """
    return tuple(-(-int(n) // int(f)) for n, f in zip(shape, factors))


def image_to_grid(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``image`` (D, H, W) resampled to ``shape`` by area averaging (each output voxel the mean of the
    input voxels it covers; both grids span the same extent), float32; ``image`` itself when the shape is its own."""
    if tuple(shape) == image.shape:
        return image
    x = torch.as_tensor(np.asarray(image, np.float32))[None, None]
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="area")[0, 0].numpy()


def label_to_grid(label: np.ndarray, shape: Sequence[int], n_classes: int) -> np.ndarray:
    """``label`` (D, H, W) resampled to ``shape`` by majority: each output voxel takes the class that covers
    most of its area (ties: the lower class), uint8; ``label`` itself when the shape is its own.

    >>> label_to_grid(np.array([[[0, 1, 2, 2], [0, 0, 2, 1]]], np.uint8), (1, 1, 2), 3).tolist()
    [[[0, 2]]]
    """
    if tuple(shape) == label.shape:
        return label
    best, out = None, np.zeros(tuple(shape), np.uint8)
    for c in range(n_classes):  # one class's (D, H, W) float32 mask at a time
        share = image_to_grid((np.asarray(label) == c).astype(np.float32), shape)
        if best is None:
            best = share
        else:
            more = share > best
            out[more], best[more] = c, share[more]
    return out


def probs_to_grid(prob: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Class probabilities ``(C, d, h, w)`` resampled to ``(C, *shape)`` by trilinear interpolation (grids of
    the same extent, voxel centres as :func:`image_to_grid` places them), float32, class by class;
    ``prob`` itself when the shape is its own. Each voxel's probabilities still sum to 1."""
    if tuple(shape) == prob.shape[1:]:
        return prob
    out = np.empty((len(prob), *shape), np.float32)
    for c in range(len(prob)):
        x = torch.as_tensor(np.asarray(prob[c], np.float32))[None, None]
        out[c] = torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()
    return out


class _SeededDropout(torch.nn.Module):
    """Dropout active at inference, its masks drawn from ``generator`` (never torch's global RNG).

    Element-wise like ``nn.Dropout``, or channel-wise like ``nn.Dropout1d/2d/3d``; scaled by 1 / (1 - p).
    """

    def __init__(self, p: float, channelwise: bool, generator: torch.Generator):
        super().__init__()
        self.p, self.channelwise, self.generator = p, channelwise, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return x
        shape = (*x.shape[:2], *(1,) * (x.ndim - 2)) if self.channelwise else x.shape
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)


def _with_dropout(net: torch.nn.Module, generator: torch.Generator | None) -> torch.nn.Module:
    """``net`` with its dropout layers off (``generator`` None) or drawing from ``generator``.

    ``net`` itself when its dropout layers are already off and none is wanted; otherwise a copy, so
    the caller's model is never changed.
    """
    dropouts = [(name, m) for name, m in net.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if generator is None and not any(m.training for _, m in dropouts):
        return net
    model = copy.deepcopy(net)
    for name, module in dropouts:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if generator is None:
            getattr(parent, attr).eval()
        elif type(module) in (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d):
            setattr(parent, attr, _SeededDropout(module.p, type(module) is not torch.nn.Dropout, generator))
        else:
            raise TypeError(f"MC dropout: {type(module).__name__} is not supported (use nn.Dropout or nn.Dropout1d/2d/3d)")
    return model
