"""The working plan of a datastore: the device, the encoder's slice size and the feature grid.

Like nnU-Net's plans, it is data chosen once from the datastore's images, written to
``<studies>/.semisam/plan.json`` and read back, so every process (the server, its background jobs,
the command line) encodes every image the same way::

    {"encoder_image_size": 64, "feature_stride": 2, "registration_voxels": 1000000,
     "planned_from": {"images": 20, "median_shape": [183, 140, 88], "median_spacing": [0.625, ...]}}

- ``encoder_image_size`` (px, multiple of 32): each 2D slice is resized to this square before the
  encoder. Planned as the median volume's largest slice edge rounded up to 32, clamped to
  [64, 256] (256 = LiteMedSAM's native input) on a GPU; on CPU 64 (LiteMedSAM: ~0.1 s per 64 px
  slice on 2 cores, ~2.6 s at 256 px).
- ``feature_stride`` (voxels): features are stored for every ``stride``-th voxel along each axis
  and interpolated (trilinear) on lookup; a thick-slice axis (spacing more than twice the finest
  and above ``THICK_SLICE_MM``) keeps stride 1 (:meth:`Plan.stride`). Planned as 2 for scans (median volume above
  ``SMALL_VOLUME_VOXELS``: 32 float16 dims = 8 bytes per image voxel) and 1 for small crops (a
  hippocampus crop's cache is ~4 MB, and every voxel keeps its own feature).
- ``registration_voxels``: template-to-target registration runs on both images bin-shrunk to at most
  this many voxels (finest axes first, towards one working spacing; smaller scans are untouched).
- ``coarsest_grid_mm`` (research, ``--set stage_one.coarsest_grid_mm=5``): when set, neither the registration
  shrink nor the feature stride coarsens an axis beyond this spacing (mm) - the voxel limit above gives way -
  unless the axis is that coarse already (two grid points across a 10 mm organ at 5 mm). 0 (the default):
  no such floor.
- ``demons_affine`` (research, ``--set stage_one.demons_affine=ants``): the affine registration the demons
  refine: ``sitk`` (the default: SimpleITK, Mattes mutual information, 2-level pyramid) or ``ants`` (ANTs'
  ``Affine``, seeded). Registrations of the other kind are cached under another file name.
- ``network_iterations``: stage-two training iterations per round when ``--conf iterations`` is
  ``auto`` (the default): :data:`CROP_ITERATIONS` for crops, :data:`SCAN_ITERATIONS` for scans (the
  same median-size rule as the feature stride).
- ``modality`` (``ct`` or ``mri``): the intensity normalisation when ``--conf modality`` is ``auto``
  (the default), detected from the first images (:func:`detect_modality`): CT when their values are
  integers (Hounsfield units, as scanners store them) with at least :data:`CT_AIR_SHARE` of the voxels
  at or below :data:`CT_AIR_HU` (air), else MRI. ``planned_from["modality_evidence"]`` keeps what it
  saw per image.

Labels, confidence and uncertainty always come back on each image's own grid: the plan changes
only how features are sampled and where registration is computed. The plan is part of the feature
cache's settings id (:attr:`Plan.id`). Explicit ``--conf`` values override the planned ones.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

from semisam_o1.volumes import atomic_write

logger = logging.getLogger(__name__)
T = TypeVar("T")

PLAN_FILE = Path(".semisam") / "plan.json"
#: LiteMedSAM's native input size (its training resolution).
NATIVE_IMAGE_SIZE = 256
#: Volumes up to this many voxels (crops) keep a feature per voxel (feature stride 1).
SMALL_VOLUME_VOXELS = 1_000_000
#: An axis counts as thick slices (never strided) only above this spacing (mm), besides being more
#: than twice the finest axis (MRI/CT thick slices: 2.5-10 mm).
THICK_SLICE_MM = 2.0
#: Stage-two training iterations per round (``--conf iterations auto``) for crops (hippocampus: 1000 reach
#: 0.81 test Dice with full supervision) and for scans, whose network sees many more distinct patches
#: (CHAOS T2, network on stage one's labels: pool Dice 0.671 after 1000, 0.708 after 3000).
CROP_ITERATIONS, SCAN_ITERATIONS = 1000, 3000
#: Slice size on CPU: the encoder's cost grows ~quadratically with it (0.1 s per slice at 64 px).
CPU_IMAGE_SIZE = 64
#: CT detection (:func:`detect_modality`): an image is CT when its values are integers and at least
#: ``CT_AIR_SHARE`` of its voxels are at or below ``CT_AIR_HU`` (air is -1000 HU; z-scored or
#: percentile-scaled MRI never goes there, and an 8-bit MRI has no negative values).
CT_AIR_HU, CT_AIR_SHARE = -900.0, 0.01
#: Images (the first ones, sorted) :func:`detect_modality` reads; the majority decides.
MODALITY_IMAGES = 3


class DeviceError(ValueError):
    """``--conf device`` asks for a device this machine does not have."""


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    Raises:
        DeviceError: naming the option, for CUDA without a usable GPU or an unknown name.
    """
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"--conf device {name}: CUDA is not available on this machine (use cpu or auto)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--conf device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        return name
    raise DeviceError(f"--conf device {name}: not one of auto, cpu, cuda, cuda:N")


def with_cpu_fallback(run: Callable[[str], T], device: str, what: str) -> T:
    """``run(device)``; if the GPU runs out of memory, a warning naming ``what`` and ``run("cpu")``."""
    import torch

    try:
        return run(device)
    except torch.cuda.OutOfMemoryError:
        if device == "cpu":
            raise
        logger.warning(f"{what}: out of GPU memory on {device}; running on the CPU instead")
        torch.cuda.empty_cache()
        return run("cpu")


@dataclass(frozen=True)
class Plan:
    """How a datastore's volumes are encoded and registered (see the module docstring)."""

    encoder_image_size: int = CPU_IMAGE_SIZE
    feature_stride: int = 2
    registration_voxels: int = 1_000_000
    network_iterations: int = 1000
    #: ``ct`` or ``mri``; ``None``: not decided yet (:func:`load_or_make_plan` detects it)
    modality: str | None = None
    #: no working grid coarser than this (mm) where the image is finer; 0: no floor (see the module docstring)
    coarsest_grid_mm: float = 0.0
    #: the affine stage under the demons registration: ``sitk`` (SimpleITK, Mattes MI) or ``ants`` (see the module docstring)
    demons_affine: str = "sitk"
    planned_from: dict = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        """What changes stored features: ``g2`` (the feature stride rule)."""
        return f"g{self.feature_stride}"

    def stride(self, spacing: Iterable[float]) -> tuple[int, int, int]:
        """Feature stride per axis for an image of voxel ``spacing`` (mm): thick-slice axes keep 1.

        An axis is thick when its spacing is more than twice the finest *and* above
        :data:`THICK_SLICE_MM`: a sub-millimetre axis is never thick, whatever the ratio (a thin-slice
        CT of 0.8 x 0.8 x 0.3 mm is strided on every axis).

        >>> Plan(feature_stride=2).stride((1.25, 1.25, 7.7))
        (2, 2, 1)
        >>> Plan(feature_stride=2).stride((0.8, 0.8, 0.3))
        (2, 2, 2)

        With :attr:`coarsest_grid_mm` no axis is strided beyond it (head-and-neck CT at 4 x 4 x 2.5 mm):

        >>> Plan(feature_stride=2).stride((3.906, 3.906, 2.5)), Plan(feature_stride=2, coarsest_grid_mm=5).stride((3.906, 3.906, 2.5))
        ((2, 2, 2), (1, 1, 2))
        """
        spacing = [float(s) for s in spacing]
        finest = min(spacing)

        def axis(s: float) -> int:
            if s > 2 * finest and s > THICK_SLICE_MM:
                return 1
            return max(1, min(self.feature_stride, int(self.coarsest_grid_mm / s + 1e-6))) if self.coarsest_grid_mm else self.feature_stride

        return tuple(axis(s) for s in spacing)

    def registration_shrink(self, shape: Iterable[int], spacing: Iterable[float]) -> tuple[int, int, int]:
        """Integer bin-shrink factors per axis that bring a volume under ``registration_voxels``
        (:func:`shrink_factors`).

        >>> Plan(registration_voxels=10_000).registration_shrink((34, 52, 11), (1.0, 1.0, 3.0))
        (2, 2, 1)

        The voxel limit gives way to :attr:`coarsest_grid_mm` (a 2.1 M voxel CT: 1.05 M on a 3.9 x 3.9 x 5 mm grid):

        >>> Plan().registration_shrink((128, 128, 128), (3.906, 3.906, 2.5)), Plan(coarsest_grid_mm=5).registration_shrink((128, 128, 128), (3.906, 3.906, 2.5))
        ((2, 2, 3), (1, 1, 2))
        """
        return shrink_factors(shape, spacing, self.registration_voxels, self.coarsest_grid_mm)

    def save(self, studies: Path) -> Path:
        return atomic_write(Path(studies) / PLAN_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2)))

    @classmethod
    def load(cls, studies: Path) -> "Plan | None":
        path = Path(studies) / PLAN_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if "network_iterations" not in data and data.get("planned_from", {}).get("median_shape"):  # a plan written before it existed
            data["network_iterations"] = planned_iterations(data["planned_from"]["median_shape"])
        return cls(**{k: data[k] for k in ("encoder_image_size", "feature_stride", "registration_voxels", "network_iterations", "modality",
                                           "coarsest_grid_mm", "demons_affine", "planned_from") if k in data})


def shrink_factors(shape: Iterable[int], spacing: Iterable[float], max_voxels: int | None,
                   coarsest_mm: float | None = None) -> tuple[int, int, int]:
    """Integer shrink factors per axis that bring a volume of ``shape`` voxels and ``spacing`` (mm) under
    ``max_voxels`` (``None`` or 0: no limit, ``(1, 1, 1)``).

    The finest axes are shrunk first, towards one working spacing, so thick slices stay whole; no axis
    keeps shrinking once it is down to 4 voxels, nor (``coarsest_mm`` given) beyond ``coarsest_mm`` mm unless
    it is that coarse already: the limit then gives way. The shrunk shape is ``ceil(n / f)`` per axis.

    >>> shrink_factors((183, 140, 88), (0.625, 0.625, 0.625), 1_000_000)  # LA: 2.3 M voxels -> 92 x 70 x 44
    (2, 2, 2)
    >>> shrink_factors((36, 256, 256), (7.7, 1.25, 1.25), 1_000_000)  # CHAOS T2: thick slices stay whole
    (1, 2, 2)
    >>> shrink_factors((36, 50, 35), (1.0, 1.0, 1.0), 1_000_000)  # a crop under the limit
    (1, 1, 1)
    """
    shape, spacing = [int(n) for n in shape], [float(v) for v in spacing]
    if not max_voxels:
        return (1,) * len(shape)
    target = min(spacing)
    if coarsest_mm:
        target = min(target, coarsest_mm)
    while True:
        factors = tuple(max(1, int(target / sp + 1e-6)) for sp in spacing)
        if np.prod([-(-n // f) for n, f in zip(shape, factors)]) <= max_voxels or min(
                -(-n // f) for n, f in zip(shape, factors)) <= 4 or (coarsest_mm and target >= coarsest_mm):
            return factors
        target = min(target * 1.1, coarsest_mm) if coarsest_mm else target * 1.1


def planned_iterations(median_shape: list[int]) -> int:
    """Stage-two iterations per round for a datastore whose median volume has ``median_shape``.

    >>> planned_iterations([35, 50, 35]), planned_iterations([256, 256, 34]), planned_iterations([])
    (1000, 3000, 3000)
    """
    return CROP_ITERATIONS if median_shape and np.prod(median_shape) <= SMALL_VOLUME_VOXELS else SCAN_ITERATIONS


def image_geometries(paths: Iterable[Path]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """``(shape, spacing)`` of each NIfTI file from its header alone (no voxel data read); unreadable files are skipped."""
    import nibabel as nib

    out = []
    for path in paths:
        try:
            header = nib.load(str(path)).header
        except Exception:
            continue
        out.append((tuple(int(s) for s in header.get_data_shape()[:3]), tuple(float(z) for z in header.get_zooms()[:3])))
    return out


def modality_evidence(path: Path) -> dict | None:
    """What :func:`detect_modality` looks at in one NIfTI image: ``{"integral": values are integers (an
    integer dtype on disk, or every value whole), "air_share": share of voxels <= CT_AIR_HU, "ct": both
    hold}``; every 4th slice of the last axis is read (the share of a whole CT is the same within a
    fraction of a percent). ``None`` for an unreadable file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        values = np.asarray(img.dataobj[..., ::4] if len(img.shape) >= 3 and img.shape[2] >= 8 else img.dataobj)
    except Exception:
        return None
    if values.size == 0:
        return None
    integral = bool(np.issubdtype(values.dtype, np.integer) or np.all(np.mod(values, 1) == 0))
    air = float(np.mean(values <= CT_AIR_HU))
    return {"image": Path(path).name, "integral": integral, "air_share": round(air, 4), "ct": integral and air >= CT_AIR_SHARE}


def detect_modality(image_paths: Iterable[Path], images: int = MODALITY_IMAGES) -> tuple[str, list[dict]]:
    """``("ct" | "mri", evidence)``: CT when most of the first ``images`` readable images (sorted) look
    like CT (:func:`modality_evidence`: integer values with >= 1 % of voxels at or below -900, i.e. air in
    Hounsfield units), else MRI (also for an empty datastore)."""
    evidence = []
    for path in sorted(Path(p) for p in image_paths):
        if len(evidence) == images:
            break
        seen = modality_evidence(path)
        if seen is not None:
            evidence.append(seen)
    ct = sum(e["ct"] for e in evidence)
    return ("ct" if evidence and 2 * ct > len(evidence) else "mri"), evidence


def make_plan(geometries: list[tuple[tuple[int, ...], tuple[float, ...]]], device: str = "cpu", feature_stride: int | None = None) -> Plan:
    """Plan from the datastore's image geometries (``[(shape, spacing), ...]``) for ``device``
    (``feature_stride`` ``None``: planned from the median volume size). The modality is left undecided
    (:func:`load_or_make_plan` detects it from the images)."""
    if geometries:
        shapes = np.array([g[0] for g in geometries])
        spacings = np.array([g[1] for g in geometries])
        median_shape = [int(v) for v in np.median(shapes, 0)]
        median_spacing = [round(float(v), 4) for v in np.median(spacings, 0)]
    else:
        median_shape, median_spacing = [], []
    if feature_stride is None:
        feature_stride = 2 if not median_shape or np.prod(median_shape) > SMALL_VOLUME_VOXELS else 1
    size = CPU_IMAGE_SIZE
    if device != "cpu" and median_shape:
        size = int(min(NATIVE_IMAGE_SIZE, max(CPU_IMAGE_SIZE, 32 * math.ceil(max(median_shape) / 32))))
    return Plan(
        encoder_image_size=size,
        feature_stride=feature_stride,
        network_iterations=planned_iterations(median_shape),
        planned_from={"images": len(geometries), "median_shape": median_shape, "median_spacing": median_spacing, "device": device},
    )


def load_or_make_plan(studies: Path, image_paths: Iterable[Path], device: str, overrides: dict | None = None) -> Plan:
    """The datastore's plan: read from ``plan.json``, else planned from ``image_paths`` and written.

    ``overrides`` (explicit ``--conf`` values, e.g. ``{"encoder_image_size": 128}``) replace the planned
    values; the file is rewritten when they change it. The modality is detected from ``image_paths``
    (:func:`detect_modality`) when the file has none (a new plan, or one written before it was planned)
    and written; an explicit ``{"modality": "ct" | "mri"}`` wins in the plan returned but is not written,
    so the file keeps what the data looks like and a later ``auto`` run detects, not inherits, it.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    image_paths = list(image_paths)
    stored = plan = Plan.load(studies)
    if plan is None:
        plan = make_plan(image_geometries(image_paths), device, overrides.get("feature_stride"))
    if plan.modality is None:
        modality, evidence = detect_modality(image_paths)
        plan = replace(plan, modality=modality, planned_from={**plan.planned_from, "modality_evidence": evidence})
        logger.info(f"plan: modality {modality} detected from {[e['image'] for e in evidence]} (--conf modality ct|mri overrides)")
    merged = Plan(**{**asdict(plan), **overrides})
    written = replace(merged, modality=plan.modality)
    if written != stored or not (Path(studies) / PLAN_FILE).exists():
        written.save(studies)
    return merged
