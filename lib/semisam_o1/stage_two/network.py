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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from semisam_o1.stage_two.params import TrainParams


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
    (:func:`~semisam_o1.stage_one.plan.shrink_factors`; ``None``: each image's own grid), so it predicts on the same one."""
    from semisam_o1.volumes import atomic_write

    payload = {"n_classes": n_classes, "channels": list(params.channels), "dropout": params.dropout, "grid_voxels": grid_voxels,
               "flip_axes": list(params.flip_axes), "state_dict": net.state_dict()}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


#: what :func:`save_network` writes, and what an uploaded checkpoint must hold
CHECKPOINT_KEYS = ("n_classes", "channels", "dropout", "grid_voxels", "flip_axes", "state_dict")


def check_network_file(path: Path, n_classes: int, name: str = "model file") -> UNet:
    """A checkpoint a client uploads (``PUT /model/semisam_o1``), read without unpickling arbitrary objects
    (``torch.load(weights_only=True)``): it must hold :data:`CHECKPOINT_KEYS`, a network of ``n_classes`` outputs (the
    app's labels and background) and weights that fit that architecture exactly.

    Raises:
        InputError: naming ``name`` and what is wrong.
    """
    from semisam_o1.volumes import InputError

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{name}: not a PyTorch checkpoint this server can read safely ({type(e).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise InputError(f"{name}: not a SemiSAM-O1 network checkpoint (missing {', '.join(missing)})")
    if int(payload["n_classes"]) != n_classes:
        raise InputError(f"{name}: a network of {payload['n_classes']} classes; this server's labels need {n_classes} (with background)")
    try:
        return load_network(path)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"{name}: its weights do not fit the network it describes ({str(e).splitlines()[0][:200]})") from None


def load_network(path: Path) -> UNet:
    """A network saved by :func:`save_network` (its own architecture), in eval mode on CPU; its attribute
    ``grid_voxels`` is the checkpoint's (``None``: each image's own grid), ``flip_axes`` the axes it was trained to be
    mirrored along.

    Raises:
        KeyError: naming the missing entry, for a checkpoint :func:`save_network` did not write."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    params = TrainParams(channels=tuple(payload["channels"]), dropout=float(payload["dropout"]))
    net = build_network(int(payload["n_classes"]), params)
    net.load_state_dict(payload["state_dict"])
    net.grid_voxels = payload["grid_voxels"]
    net.flip_axes = tuple(payload["flip_axes"])
    return net.eval()
































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
