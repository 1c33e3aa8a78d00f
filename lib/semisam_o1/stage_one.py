"""Stage one: template labels -> pseudo-label and confidence of any image, from cached features.

Pipeline per target image (every step cached on disk under ``<studies>/.semisam/``):

1. features: :class:`~semisam_o1.feature_cache.FeatureCache` (the encoder runs once per image);
2. alignment: affine + demons registration of each template to the target (``registration/*.h5``), used as a
   spatial prior: each target voxel knows where it falls in each template;
3. propagation: voxel k-nearest-neighbour label transfer from every template
   (:mod:`semisam_o1.propagation`), votes fused over templates.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from semisam_o1.feature_cache import FeatureCache, FeatureGrid, stored_grid
from semisam_o1.plan import check_memory
from semisam_o1.propagation import TemplateBank, build_bank, class_prototypes, propagate, propagate_prototypes
from semisam_o1.registration import affine_register, map_voxels, read_image, refine_register, shrink
from semisam_o1.sample_data import sha256
from semisam_o1.templates import Template
from semisam_o1.volumes import InputError, Volume, atomic_write, class_volumes, load_image, load_label

logger = logging.getLogger(__name__)


def nib_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """An image file's voxel shape and spacing (mm) from its header."""
    import nibabel as nib

    header = nib.load(str(path)).header
    return tuple(int(n) for n in header.get_data_shape()[:3]), tuple(float(z) for z in header.get_zooms()[:3])


#: ITK's HDF5 library is not thread-safe: transform files are read and written one at a time per
#: process (the infer request and the background template refresh both use them).
_HDF5_LOCK = threading.Lock()


#: ``fusion``: registration-guided feature label fusion (default); ``prototype``: the paper's one
#: masked-mean prototype per class, cosine similarity, arg-max (ablation).
PROPAGATIONS = ("fusion", "prototype")


class NoTemplateError(InputError):
    """Stage one needs at least one image with a ``final`` label."""


@dataclass
class Prediction:
    """Stage-one output for one image: ``label`` (D, H, W) uint8 and ``confidence`` (D, H, W) float32 in [0, 1]."""

    image: Volume
    label: np.ndarray
    confidence: np.ndarray

    def summary(self, label_names: dict[str, int]) -> dict:
        """Per-class volume (mm^3 and voxels) and mean confidence, for the infer task's JSON."""
        classes = class_volumes(self.label, self.image, label_names)
        for entry in classes.values():
            mask = self.label == entry["value"]
            entry["mean_confidence"] = round(float(self.confidence[mask].mean()), 4) if entry["voxels"] else None
        return {"classes": classes, "mean_confidence": round(float(self.confidence.mean()), 4)}


class StageOne:
    """Propagates the templates' labels to any image of the datastore.

    Args:
        studies: datastore folder (caches go to ``studies/.semisam``).
        cache: feature cache of the datastore.
        label_values: allowed label values (from the label map); template labels are checked against it.
    """

    def __init__(self, studies: Path, cache: FeatureCache, label_values: set[int] | None = None, propagation: str = "fusion"):
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got '{propagation}'")
        self.studies = Path(studies)
        self.cache = cache
        self.label_values = label_values
        self.propagation = propagation
        self._banks: dict[tuple, TemplateBank] = {}

    def registration_path(self, target: Path, template: Path) -> Path:
        factors = ["".join(map(str, self.cache.plan.registration_shrink(*nib_geometry(p)))) for p in (target, template)]
        grid = "" if factors == ["111", "111"] else f"-shrink{factors[0]}-{factors[1]}"
        return self.studies / ".semisam" / "registration" / f"{sha256(target)[:20]}-{sha256(template)[:20]}-affine-demons{grid}.h5"

    def transform(self, target: Path, template: Path) -> sitk.Transform:
        """Affine + demons target -> template (physical mm), registered once and kept on disk (HDF5).

        Volumes above the plan's ``registration_voxels`` are registered on a shrunk copy (bin average)."""
        path = self.registration_path(target, template)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{path}.lock"):  # one registration per pair: a job or another request may be at it
                if not path.exists():
                    fixed, moving = read_image(target), read_image(template)
                    fixed = shrink(fixed, self.cache.plan.registration_shrink(fixed.GetSize(), fixed.GetSpacing()))
                    moving = shrink(moving, self.cache.plan.registration_shrink(moving.GetSize(), moving.GetSpacing()))
                    transform = refine_register(fixed, moving, affine_register(fixed, moving), "demons")
                    with _HDF5_LOCK:
                        atomic_write(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)))
                    return transform
        with _HDF5_LOCK:
            return sitk.ReadTransform(str(path))

    def frame_positions(self, image_path: Path, frame: Path) -> FeatureGrid:
        """Every voxel of ``image_path`` as a continuous voxel index of the image ``frame`` (a template),
        through the cached registration (identity when they are the same file).

        Returns a :class:`FeatureGrid` of 3 channels stored at the plan's feature stride (positions are
        smooth: trilinear lookup), mapped a slab at a time, so it holds 12 / stride^3 bytes per voxel.
        """
        same = Path(image_path).resolve() == Path(frame).resolve()
        transform = sitk.Transform(3, sitk.sitkIdentity) if same else self.transform(Path(image_path), Path(frame))
        fixed, moving = read_image(str(image_path)), read_image(str(frame))
        shape = tuple(fixed.GetSize())
        stride = self.cache.plan.stride(fixed.GetSpacing())
        kept = stored_grid(shape, stride)
        slabs = [map_voxels(fixed, transform, moving, int(z), int(z) + 1)[0][kept[1]][:, kept[2]] for z in kept[0]]
        return FeatureGrid(np.stack(slabs), stride, shape)

    def _predict_prototypes(self, image: Volume, templates: list[Template], progress: bool) -> Prediction:
        """The paper's stage one (ablation): class prototypes of every template, nearest by cosine."""
        labels = [load_label(t.label_path, load_image(t.image_path), allowed=self.label_values) for t in templates]
        n_classes = 1 + max(int(lab.max()) for lab in labels)
        protos = [class_prototypes(self.cache.get_or_compute(load_image(t.image_path), progress=progress), lab, n_classes)
                  for t, lab in zip(templates, labels)]
        label, confidence = propagate_prototypes(protos, self.cache.get_or_compute(image, progress=progress), image.array.shape)
        return Prediction(image=image, label=label, confidence=confidence)

    def bank(self, template: Template, progress: bool = False) -> TemplateBank:
        """Sampled, labelled feature vectors of one template (rebuilt when its files change)."""
        stat = template.label_path.stat()
        key = (str(template.image_path), sha256(template.image_path), str(template.label_path), stat.st_mtime_ns, stat.st_size)
        if key not in self._banks:
            image = load_image(template.image_path)
            label = load_label(template.label_path, image, allowed=self.label_values)
            feats = self.cache.get_or_compute(image, progress=progress)
            self._banks[key] = build_bank(self._normalized(image), label, feats)
        return self._banks[key]

    def _normalized(self, image: Volume) -> np.ndarray:
        from semisam_o1.normalize import normalize

        return normalize(image.array, self.cache.modality)

    def predict(self, image_path: Path | str, templates: list[Template], progress: bool = False) -> Prediction:
        """Pseudo-label and confidence of one image.

        Raises:
            NoTemplateError: no template in ``templates``.
            InputError: the image or a template label is bad (message names the file).
        """
        if not templates:
            raise NoTemplateError(
                "stage one needs a template: save a 'final' label for at least one image "
                "(PUT /datastore/label?tag=final) and try again"
            )
        image = load_image(image_path)
        # label + confidence outputs, the normalised copy, one registration slab at a time
        check_memory(f"{image.path}: stage one", image.array.shape, 4 + 1 + 4 + 4)
        if self.propagation == "prototype":
            return self._predict_prototypes(image, templates, progress)
        banks = [self.bank(t, progress) for t in templates]
        feats = self.cache.get_or_compute(image, progress=progress)
        target_itk = read_image(image.path)
        coords = [partial(map_voxels, target_itk, self.transform(image.path, t.image_path), read_image(t.image_path)) for t in templates]
        label, confidence = propagate(banks, self._normalized(image), feats, coords)
        return Prediction(image=image, label=label, confidence=confidence)
