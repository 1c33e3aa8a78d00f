"""Stage one: template labels -> pseudo-label and confidence of any image, from cached features.

Pipeline per target image (every step cached on disk under ``<studies>/.semisam/``):

1. features: :class:`~semisam_o1.stage_one.feature_cache.FeatureCache` (the encoder runs once per image);
2. alignment: registration of each template to the target (``registration/*.npz``, the method in the
   file name: affine + demons, ANTs SyN with ``--conf registration syn``, or both with
   ``demons+syn``), used as a spatial prior: each target voxel knows where it falls in each template
   (with ``demons+syn``, twice). With several mappings (templates x registrations), those whose
   feature consistency (:func:`~semisam_o1.stage_one.propagation.mapping_consistency`) is clearly below the
   best one's are left out (:attr:`Prediction.mappings`);
3. propagation: voxel k-nearest-neighbour label transfer from every template
   (:mod:`semisam_o1.stage_one.propagation`), votes fused over templates;
4. safety floor (:func:`registration_floor`): per class, where the feature votes disagree with the
   registration-only warp of the template labels (low agreement, or a volume far from the warp's),
   the class falls back to the warp; :meth:`Prediction.summary` names those classes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semisam_o1.choices import PROPAGATIONS, REGISTRATIONS
from semisam_o1.stage_one.feature_cache import FeatureCache, FeatureGrid, stored_grid
from semisam_o1.stage_one.params import FloorParams, PropagationParams
from semisam_o1.stage_one.propagation import (
    TemplateBank,
    build_bank,
    consistent_mappings,
    mapping_consistency,
    propagate,
)
from semisam_o1.stage_one.prototypes import predict_prototypes
from semisam_o1.stage_one.registration import RegistrationCache, map_voxels, warp_label
from semisam_o1.templates import Template
from semisam_o1.volumes import (
    PROCESS_BYTES_PER_VOXEL,
    InputError,
    Volume,
    check_memory,
    class_volumes,
    load_image,
    load_label,
    read_sitk,
    read_sitk_grid,
    sha256,
)

logger = logging.getLogger(__name__)


class NoTemplateError(InputError):
    """Stage one needs at least one image with a ``final`` label."""


def registration_floor(label: np.ndarray, warped, classes, params: FloorParams = FloorParams()) -> tuple[np.ndarray, dict[int, dict]]:
    """Per class, keep the feature vote or fall back to the registration-only warp (no ground truth used).

    Args:
        label: ``(D, H, W)`` uint8 stage-one vote.
        warped: ``(D, H, W)`` uint8 the template labels warped by registration alone, same grid; or
            ``{method: warp}`` when several registrations voted: per class the vote stands if it passes
            the check against any warp; otherwise it falls back to the warp that agrees best with it.
        classes: class values to check.

    Returns:
        the label with every fallen-back class replaced by its warp (those voxels only; the warp
        never overwrites a class that kept its vote), and per class ``{"agreement": Dice(vote, warp),
        "volume_ratio": |vote| / |warp|, "fallback": bool}`` (plus ``"registration"``: the method
        of the warp used, when ``warped`` is a dict).
    """
    warps = warped if isinstance(warped, dict) else {"": warped}
    out, stats, fallen = label.copy(), {}, {}
    for c in classes:
        a = label == c
        checks = {}
        for method, warp in warps.items():
            w = warp == c
            na, nw = int(a.sum()), int(w.sum())
            agreement = 2 * int((a & w).sum()) / (na + nw) if na + nw else 1.0
            ratio = na / nw if nw else (1.0 if na == 0 else float("inf"))
            fallback = params.enabled and nw > 0 and (agreement < params.min_agreement or not (1 / params.max_volume_ratio <= ratio <= params.max_volume_ratio))
            checks[method] = {"agreement": round(agreement, 4), "volume_ratio": round(ratio, 4), "fallback": bool(fallback)}
        method = max(checks, key=lambda m: (not checks[m]["fallback"], checks[m]["agreement"]))  # a passing check wins
        stats[int(c)] = {**checks[method], **({"registration": method} if method else {})}
        if checks[method]["fallback"]:
            fallen[int(c)] = warps[method]
    for c in fallen:
        out[out == c] = 0
    for c, warp in fallen.items():
        out[(warp == c) & ((out == 0) | np.isin(label, list(fallen)))] = c
    return out, stats


@dataclass
class Prediction:
    """Stage-one output for one image: ``label`` (D, H, W) uint8 and ``confidence`` (D, H, W) float32 in [0, 1].

    ``floor``: per class value, the safety floor's check (:func:`registration_floor`); ``voted``: the
    label before the floor (``None`` when nothing fell back)."""

    image: Volume
    label: np.ndarray
    confidence: np.ndarray
    floor: dict = field(default_factory=dict)
    voted: np.ndarray | None = None
    #: with several mappings, or one and ``score_mappings``: ``{"<template id>:<registration>": {"consistency": float, "used": bool}}``
    #: (:func:`~semisam_o1.stage_one.propagation.mapping_consistency`)
    mappings: dict = field(default_factory=dict)

    @property
    def fallback_values(self) -> list[int]:
        return sorted(c for c, f in self.floor.items() if f["fallback"])

    def summary(self, label_names: dict[str, int]) -> dict:
        """Per-class volume (mm^3 and voxels), mean confidence and source (``features``, or ``registration``
        where the safety floor fell back), and ``registration_fallback``: the names of those classes."""
        classes = class_volumes(self.label, self.image, label_names)
        for entry in classes.values():
            mask = self.label == entry["value"]
            entry["mean_confidence"] = round(float(self.confidence[mask].mean()), 4) if entry["voxels"] else None
            entry["source"] = "registration" if entry["value"] in self.fallback_values else "features"
        fallen = [name for name, value in label_names.items() if value in self.fallback_values]
        left_out = [name for name, m in self.mappings.items() if not m["used"]]
        return {"classes": classes, "mean_confidence": round(float(self.confidence.mean()), 4), "registration_fallback": fallen,
                **({"mappings_left_out": left_out} if left_out else {})}


class StageOne:
    """Propagates the templates' labels to any image of the datastore.

    Args:
        studies: datastore folder (caches go to ``studies/.semisam``).
        cache: feature cache of the datastore.
        label_values: allowed label values (from the label map); template labels are checked against it.
        label_names: the label map ``{name: value}``: every class must have voxels in every template.
        registration: the spatial prior: one of :data:`~semisam_o1.choices.REGISTRATIONS`, or
            several joined by ``+`` (e.g. ``demons+syn``: every template is registered by each, and each
            mapping votes as if it were another template).
        params: propagation parameters; ``floor``: the safety floor's.
    """

    def __init__(self, studies: Path, cache: FeatureCache, label_values: set[int] | None = None, label_names: dict[str, int] | None = None,
                 registration: str = "demons+syn", params: PropagationParams | None = None, floor: FloorParams | None = None,
                 propagation: str = "fusion"):
        self.methods = tuple(registration.split("+"))
        if not self.methods or any(m not in REGISTRATIONS for m in self.methods):
            raise ValueError(f"registration '{registration}' is not one of {', '.join(REGISTRATIONS)} (or several joined by '+')")
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got '{propagation}'")
        self.studies = Path(studies)
        self.cache = cache
        self.label_names = dict(label_names or {})
        self.label_values = label_values if label_values is not None else (set(self.label_names.values()) or None)
        self.registration = registration
        self.propagation = propagation
        self.params = params or PropagationParams()
        self.floor = floor or FloorParams()
        self._banks: dict[tuple, TemplateBank] = {}
        self._consistency: dict[tuple, float] = {}  # mapping_consistency per (registration file, template label, settings)

    def settings(self) -> dict:
        """What this stage one's labels depend on besides the images and templates, as plain data:
        ``{"features": the feature cache's settings id, "registration", "propagation", "params": PropagationParams
        fields, "floor": FloorParams fields}``, and ``"demons_affine"`` where the plan's is not the default ``sitk``
        (stage two records it with a run's inputs and uncertainty scores are versioned by it, so a changed setting
        is neither resumed on old labels nor served old scores)."""
        affine = self.cache.plan.demons_affine
        return {"features": self.cache.settings_id, "registration": self.registration, "propagation": self.propagation,
                "params": asdict(self.params), "floor": asdict(self.floor), **({"demons_affine": affine} if affine != "sitk" else {})}

    @property
    def registrations(self) -> RegistrationCache:
        """The datastore's registration cache, on the feature cache's current plan."""
        return RegistrationCache(self.studies / ".semisam" / "registration", self.cache.plan)

    def registration_path(self, target: Path, template: Path, method: str | None = None) -> Path:
        """The cache file of ``method``'s registration (default: the first of :attr:`methods`)."""
        return self.registrations.path(Path(target), Path(template), method or self.methods[0])

    def transform(self, target: Path, template: Path, method: str | None = None) -> sitk.Transform:
        """Target -> template registration (physical mm) with ``method`` (default: the first of :attr:`methods`),
        from the datastore's :class:`~semisam_o1.stage_one.registration.RegistrationCache`.

        Raises:
            RegistrationError: naming both images, when the registration fails (e.g. no overlap).
        """
        return self.registrations.transform(Path(target), Path(template), method or self.methods[0])

    def frame_positions(self, image_path: Path, frame: Path) -> FeatureGrid:
        """Every voxel of ``image_path`` as a continuous voxel index of the image ``frame`` (a template),
        through the cached registration (identity when they are the same file).

        Returns a :class:`FeatureGrid` of 3 channels stored at the plan's feature stride (positions are
        smooth: trilinear lookup), mapped a slab at a time, so it holds 12 / stride^3 bytes per voxel.
        """
        same = Path(image_path).resolve() == Path(frame).resolve()
        transform = sitk.Transform(3, sitk.sitkIdentity) if same else self.transform(Path(image_path), Path(frame))
        fixed, moving = read_sitk_grid(image_path), read_sitk_grid(frame)
        shape = tuple(fixed.GetSize())
        stride = self.cache.plan.stride(fixed.GetSpacing())
        kept = stored_grid(shape, stride)
        slabs = [map_voxels(fixed, transform, moving, int(z), int(z) + 1)[0][kept[1]][:, kept[2]] for z in kept[0]]
        return FeatureGrid(np.stack(slabs), stride, shape)

    @staticmethod
    def _bank_key(template: Template) -> tuple:
        stat = template.label_path.stat()
        return (str(template.image_path), sha256(template.image_path), str(template.label_path), stat.st_mtime_ns, stat.st_size)

    def bank(self, template: Template, progress: bool = False) -> TemplateBank:
        """Sampled, labelled feature vectors of one template (rebuilt when its files change)."""
        key = self._bank_key(template)
        if key not in self._banks:
            image = load_image(template.image_path)
            label = load_label(template.label_path, image, allowed=self.label_values)
            present = set(np.unique(label).tolist())
            missing = [f"'{name}' (value {value})" for name, value in self.label_names.items() if value not in present]
            if missing:
                raise InputError(f"{template.label_path}: template label has no voxels of class {', '.join(missing)} "
                                 f"declared in the label map; label every class or remove it from --conf labels")
            feats = self.cache.get_or_compute(image, progress=progress)
            self._banks[key] = build_bank(None, label, feats, params=self.params, spacing=image.spacing)
        return self._banks[key]

    def _mapping_consistency(self, image: Volume, template: Template, method: str, bank: TemplateBank, feats, coords) -> float:
        """:func:`~semisam_o1.propagation.mapping_consistency` of one mapping, kept in memory per registration file (named by
        both images' contents and the grid), template label and settings: stage two's pseudo-template pass predicts every pool
        image again from the real templates plus the pseudo-templates, and the real templates' mappings score the same."""
        key = (str(self.registration_path(image.path, template.image_path, method)), self._bank_key(template), self.cache.settings_id,
               repr(self.params))
        if key not in self._consistency:
            self._consistency[key] = mapping_consistency(bank, feats, coords, image.array.shape, self.params)
        return self._consistency[key]

    def warped_labels(self, image_path: Path, templates: list[Template], method: str | None = None) -> np.ndarray:
        """The registration-only prediction of ``method`` (default: the first of :attr:`methods`): each
        template label warped (nearest neighbour) by its cached registration, majority vote over
        templates: ``(D, H, W)`` uint8 on the image's grid."""
        target = read_sitk_grid(image_path)
        warps = [warp_label(read_sitk(t.label_path, sitk.sitkUInt8), target, self.transform(Path(image_path), t.image_path, method))
                 for t in templates]
        if len(warps) == 1:
            return warps[0]
        counts = np.stack([sum((w == c).astype(np.uint8) for w in warps) for c in range(int(max(w.max() for w in warps)) + 1)])
        return counts.argmax(0).astype(np.uint8)

    def predict(self, image_path: Path | str, templates: list[Template], progress: bool = False,
                score_mappings: bool = False) -> Prediction:
        """Pseudo-label and confidence of one image. ``score_mappings``: record the feature consistency
        of a single mapping too (:attr:`Prediction.mappings`; with several it is always scored).

        Raises:
            NoTemplateError: no template in ``templates``.
            InputError: the image or a template label is bad (message names the file and the class).
            RegistrationError: a template could not be registered to the image (message names both).
        """
        if not templates:
            raise NoTemplateError(
                "stage one needs a template: save a 'final' label for at least one image "
                "(PUT /datastore/label?tag=final) and try again; the 'representative' strategy "
                "(POST /activelearning/representative) names the image to annotate first"
            )
        image = load_image(image_path)
        # the image, label + confidence outputs, the vote state of the searched box (best, 2 class votes, smoothing)
        check_memory(f"{image.path}: stage one", image.array.shape, PROCESS_BYTES_PER_VOXEL)
        if self.propagation == "prototype":  # the paper's stage one (ablation): no registration, no safety floor
            label, confidence = predict_prototypes(self.cache, image, templates, self.label_values, progress)
            return Prediction(image=image, label=label, confidence=confidence)
        pairs = [(t, m) for t in templates for m in self.methods]  # one mapping per template and registration
        banks = [self.bank(t, progress) for t, _ in pairs]
        feats = self.cache.get_or_compute(image, progress=progress)
        target_grid = read_sitk_grid(image.path)  # mapped a slab at a time: the grid is all map_voxels reads
        coords = [partial(map_voxels, target_grid, self.transform(image.path, t.image_path, m), read_sitk_grid(t.image_path)) for t, m in pairs]
        mappings = {}
        if len(pairs) > 1 or score_mappings:  # leave out the mappings the features contradict (failed registrations)
            scores = [self._mapping_consistency(image, t, m, b, feats, c) for (t, m), b, c in zip(pairs, banks, coords)]
            keep = consistent_mappings(scores, self.params.mapping_tolerance)
            mappings = {f"{t.image_id}:{m}": {"consistency": round(s, 4), "used": k} for (t, m), s, k in zip(pairs, scores, keep)}
            if not all(keep):
                logger.info(f"stage 1: {image.path.name}: mappings left out (feature consistency): {mappings}")
            pairs, banks, coords = ([x for x, k in zip(xs, keep) if k] for xs in (pairs, banks, coords))
        voted, confidence = propagate(banks, image.array, feats, coords, self.params, spacing=image.spacing)
        classes = sorted(set().union(*[set(np.unique(b.labels).tolist()) for b in banks]) - {0})
        methods = [m for m in self.methods if any(pm == m for _, pm in pairs)]
        warps = {m: self.warped_labels(image.path, [t for t, pm in pairs if pm == m], m) for m in methods}
        label, floor = registration_floor(voted, warps if len(warps) > 1 else warps[methods[0]], classes, self.floor)
        fell = any(f["fallback"] for f in floor.values())
        if fell:
            logger.info(f"stage 1: {image.path.name}: classes {[c for c, f in floor.items() if f['fallback']]} fall back to the registration ({floor})")
        return Prediction(image=image, label=label, confidence=confidence, floor=floor, voted=voted if fell else None, mappings=mappings)
