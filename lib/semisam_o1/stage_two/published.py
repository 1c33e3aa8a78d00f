"""The published stage-two network: what the infer task serves and uncertainty scoring reads (the round chosen
without ground truth, ``<work>/model.pt``), its prediction on any image with voxel-wise entropy, and its version.

The network's grid: training and prediction see each image shrunk (area average; labels by majority)
to at most ``network_voxels`` voxels (:func:`~semisam_o1.stage_one.plan.shrink_factors`); its soft labels come
back to the image's own grid by trilinear interpolation, so every file above is on the image's grid
except ``images/``. Training mirrors patches, and prediction averages mirrored passes, only along the
axes where no class of the templates' labels mirrors onto another (:func:`~semisam_o1.stage_two.network.mirror_axes`:
a mirrored left kidney looks like a right one). The checkpoint records both (``grid_voxels``,
``flip_axes``): a served network predicts as it was trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_one.plan import shrink_factors, with_cpu_fallback
from semisam_o1.stage_two.network import (
    entropy,
    image_to_grid,
    load_network,
    predict_with_uncertainty,
    probs_to_grid,
    shrunk_shape,
)
from semisam_o1.volumes import Volume, check_memory, load_label, load_map, sha256


class PublishedModel:
    """The published network of :class:`~semisam_o1.stage_two.rounds.StageTwo` (mixed in: uses its ``work``,
    ``params``, ``stage_one`` and ``device``)."""

    def load_model(self) -> torch.nn.Module | None:
        """The published network (latest finished round), or ``None`` before any training."""
        return load_network(self.model_path) if self.model_path.exists() else None

    def predict(self, net: torch.nn.Module, image: Volume) -> tuple[np.ndarray, np.ndarray]:
        """``net`` on one image (flip TTA, no MC dropout): label ``(D, H, W)`` uint8 and entropy ``(D, H, W)`` nats."""
        prob, ent = self._predict(net, image, mc_samples=0)
        return prob.argmax(0).astype(np.uint8), ent

    def _predict(self, net: torch.nn.Module, image: Volume, mc_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`predict_with_uncertainty` on the stage's device (the CPU if the GPU runs out of memory), on
        the network's grid (its ``grid_voxels``, :meth:`network_shape`); the soft labels ``(C, D, H, W)`` and
        their entropy come back on ``image``'s grid.

        Raises:
            InputError: naming the image and its size, when its prediction would not fit in the memory
                available (HTTP 422 on the server), instead of an out-of-memory kill.
        """
        # the image and its normalised copy, the flipped input, the running sum and one pass (C each), the entropy
        check_memory(f"{image.path}: network prediction", image.array.shape, 4 * 3 + 8 * net.out_channels + 8)
        x = image_to_grid(normalize(image.array, self.stage_one.cache.modality), self.network_shape(image, getattr(net, "grid_voxels", None)))
        prob, ent = with_cpu_fallback(lambda device: predict_with_uncertainty(net, x, self.params.train.patch, mc_samples, device=device),
                                      self.device, f"predicting {image.path.name}")
        if prob.shape[1:] == image.array.shape:
            return prob, ent
        del ent, x
        prob = probs_to_grid(prob, image.array.shape)  # back to the image's grid
        return prob, entropy(prob)

    @staticmethod
    def network_shape(image: Volume, grid_voxels: int | None) -> tuple[int, int, int]:
        """The grid a network trained under ``grid_voxels`` (:data:`StageTwoParams.network_voxels`) sees ``image`` on."""
        return shrunk_shape(image.array.shape, shrink_factors(image.array.shape, image.spacing, grid_voxels))

    @staticmethod
    def summary(state: dict) -> dict:
        """What a run reports (train status, ``rounds.json``): ``rounds`` (per-round stats), ``published`` (the
        round served and the signal that chose it), ``stopped_early``, ``pseudo_templates``, ``pseudo_templates_volume_change``,
        ``pseudo_templates_note`` and ``boundary_changed`` (round 0's snapped borders, :meth:`_round_zero`)."""
        return {"rounds": state["rounds"], "published": state.get("published"), "stopped_early": state.get("stopped_early"),
                "pseudo_templates": state.get("pseudo_templates", []), "pseudo_templates_volume_change": state.get("pseudo_templates_volume_change"),
                "pseudo_templates_note": state.get("pseudo_templates_note"), "boundary_changed": state.get("boundary_changed")}

    @staticmethod
    def published(state: dict) -> int:
        """The published round of a committed ``state`` (0 before any round)."""
        return int(state.get("published", {}).get("round", len(state["rounds"])))

    def published_round(self) -> Path | None:
        """Folder of the round whose network is the published one; ``None`` when the published model
        is not that committed round's (e.g. a new run was started) or nothing is published."""
        state = self.state()
        round_dir = self.work / f"round_{self.published(state)}"
        if not state["rounds"] or not self.model_path.exists() or sha256(round_dir / "model.pt") != sha256(self.model_path):
            return None
        return round_dir

    @staticmethod
    def saved_uncertainty(round_dir: Path, image: Volume, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Pseudo-label and entropy map that round ``round_dir`` wrote for ``image_id`` (``None`` if it was not in its pool)."""
        paths = (round_dir / "labels" / f"{image_id}.nii.gz", round_dir / "uncertainty" / f"{image_id}.nii.gz")
        if not all(p.exists() for p in paths):
            return None
        return load_label(paths[0], image, require_foreground=False), load_map(paths[1])

    def export_bundle(self, out: Path, labels: dict[str, int]) -> Path:
        """The published network as a MONAI Bundle in the folder ``out`` (:func:`~semisam_o1.stage_two.export.export_bundle`)
        with this stage's inference patch, the plan's modality and median spacing, and ``labels`` ``{name: value}``.

        Raises:
            NothingPublished: before any training (nothing published)."""
        from semisam_o1 import __version__
        from semisam_o1.stage_two.export import export_bundle

        plan = self.stage_one.cache.plan
        return export_bundle(self.model_path, out, labels, self.params.train.patch, self.stage_one.cache.modality,
                             plan.planned_from.get("median_spacing"), self.model_version() or "", __version__)

    def model_version(self) -> str | None:
        """Content hash of the published network (changes with every finished round), ``None`` before any."""
        return f"stage2-{sha256(self.model_path)[:12]}" if self.model_path.exists() else None
