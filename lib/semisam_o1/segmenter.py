"""Stage two's 3D network: trained from scratch on (pseudo-)labels, predicting with voxel-wise uncertainty.

- :func:`build_network`: MONAI ``UNet`` with dropout (dropout also drives MC-dropout uncertainty).
- :func:`train_network`: patches read straight from (memory-mapped) volumes by :class:`PatchSampler`
  (2 of 3 centred on foreground), MONAI dictionary transforms on each patch (flips, intensity jitter),
  Dice + cross-entropy loss, Adam; a fixed number of iterations, sized for CPU. Only the patches are
  ever in memory, so the pool may be ``np.load(..., mmap_mode="r")`` arrays of any size.
- :func:`predict_with_uncertainty`: MONAI sliding-window inference averaged over flips (TTA) and
  MC-dropout passes; returns the mean softmax and its entropy.

Volumes are ``(D, H, W)`` float32 in [0, 1] (already normalised); labels ``(D, H, W)`` int.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd


@dataclass(frozen=True)
class TrainParams:
    """Training budget and shapes (defaults sized for 2 CPU cores and hippocampus-sized volumes)."""

    patch: tuple[int, int, int] = (32, 32, 32)
    iterations: int = 1000
    batch_size: int = 4
    learning_rate: float = 3e-3
    #: (8, ..., 64) trains 1.5x faster than (16, ..., 128) at the same Dice on hippocampus
    #: (full supervision, 30 volumes, 1000 iterations: 0.811 vs 0.807).
    channels: tuple[int, ...] = (8, 16, 32, 64)
    dropout: float = 0.1
    seed: int = 0


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


def save_network(net: UNet, n_classes: int, path: Path, params: TrainParams = TrainParams()) -> Path:
    """Checkpoint that describes itself: ``{"n_classes", "channels", "dropout", "state_dict"}`` (written atomically)."""
    from semisam_o1.volumes import atomic_write

    payload = {"n_classes": n_classes, "channels": list(params.channels), "dropout": params.dropout, "state_dict": net.state_dict()}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_network(path: Path) -> UNet:
    """A network saved by :func:`save_network` (its own architecture), in eval mode on CPU."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # checkpoints written before the architecture was recorded used the then default (16, ..., 128), dropout 0.1
    params = TrainParams(channels=tuple(payload.get("channels", (16, 32, 64, 128))), dropout=float(payload.get("dropout", 0.1)))
    net = build_network(int(payload["n_classes"]), params)
    net.load_state_dict(payload["state_dict"])
    return net.eval()


class PatchSampler(Sequence):
    """One random training patch per case and access: ``{"image": (1, *patch) float32, "label": (1, *patch) uint8}``.

    What MONAI's ``SpatialPadd`` + ``RandCropByPosNegLabeld(pos=2, neg=1)`` do, reading only the patch:
    MONAI's crop first turns the whole volume into a tensor, i.e. the whole pool into memory, once per
    step. A patch is centred on a foreground voxel (label > 0) with probability ``pos / (pos + neg)``,
    else on a background voxel, moved so that it lies inside the volume; a volume smaller than the patch
    is zero-padded evenly on both sides. Candidate centres: a uniform sample of at most ``max_points``
    foreground and as many background voxels per case, found slab by slab (never a whole-volume copy).

    Args:
        images: (D, H, W) arrays in [0, 1] (``np.memmap`` welcome); labels: (D, H, W) integer arrays.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch: Sequence[int],
                 pos: int = 2, neg: int = 1, seed: int = 0, max_points: int = 20000):
        self.images, self.labels, self.patch = list(images), list(labels), tuple(int(p) for p in patch)
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
        start = [min(max(c - p // 2, 0), max(n - p, 0)) for c, p, n in zip(centre, self.patch, label.shape)]
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        x, y = np.asarray(image[box], np.float32), np.asarray(label[box], np.uint8)
        pad = [((p - n) // 2, p - n - (p - n) // 2) for p, n in zip(self.patch, x.shape)]
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
) -> UNet:
    """Train a fresh network on ``images`` (each (D, H, W) in [0, 1]) and ``labels`` (each (D, H, W) int).

    Args:
        on_iteration: called as ``on_iteration(iteration, loss)`` after every step (progress, stats).
        device: where the network trains (patches are cropped on the CPU); it is returned on the CPU.
    """
    torch.manual_seed(params.seed)
    keys = ["image", "label"]
    transform = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    transform.set_random_state(seed=params.seed)
    patches = PatchSampler(images, labels, params.patch, seed=params.seed)
    loader = DataLoader(Dataset(patches, transform), batch_size=params.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(params.seed))
    net = build_network(n_classes, params).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / params.iterations)))
    net.train()
    iteration = 0
    while iteration < params.iterations:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"].to(device)), batch["label"].to(device).long())
            loss.backward()
            optimizer.step()
            scheduler.step()
            iteration += 1
            if on_iteration is not None:
                on_iteration(iteration, loss.detach().item())
            if iteration >= params.iterations:
                break
    net.eval()
    return net.cpu()


@torch.no_grad()
def predict_with_uncertainty(net: UNet, image: np.ndarray, patch: Sequence[int], mc_samples: int = 2, flips: bool = True,
                             device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean softmax (C, D, H, W) and its entropy (D, H, W) in nats, over flips x MC-dropout passes.

    With ``mc_samples`` = 0 dropout stays off (deterministic, one pass per flip). MC-dropout pass
    ``s`` draws its masks from a local generator seeded with ``s`` (reproducible). Nothing outside
    the call changes: not ``net`` (dropout is switched on a copy when needed, so concurrent requests
    sharing one model never see each other's mode), not torch's global random state. Patches run on
    ``device``; the volume and the stitched output stay on the CPU (any volume size fits the GPU).
    """
    net = net.to(device)
    x = torch.as_tensor(image, dtype=torch.float32)[None, None]
    flip_sets = [(), (2,), (3,), (4,)] if flips else [()]
    passes = max(mc_samples, 1)
    generator = torch.Generator(device=torch.device(device))
    model = _with_dropout(net, generator if mc_samples > 0 else None)
    total = None
    for dims in flip_sets:
        for sample in range(passes):
            generator.manual_seed(sample)
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi_size=tuple(patch), sw_batch_size=4, predictor=model, overlap=0.25, mode="gaussian",
                                              sw_device=device, device="cpu")
            prob = torch.softmax(logits, 1)
            prob = torch.flip(prob, dims) if dims else prob
            total = prob if total is None else total + prob
    mean = (total / (len(flip_sets) * passes))[0].numpy()
    return mean, entropy(mean)


def entropy(prob: np.ndarray) -> np.ndarray:
    """Entropy (D, H, W) in nats of class probabilities ``prob`` (C, D, H, W)."""
    return -(prob * np.log(np.clip(prob, 1e-8, None))).sum(0).astype(np.float32)


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
