"""Active-learning strategies ``representative``, ``uncertain``, ``diverse`` and ``uncertain_diverse`` (POST /activelearning/<name>).

Each returns ``{"id", "why", ...}`` for the next image to label. Candidates are the images without a
``final`` label that no other client was served within ``skip_seconds`` (MONAI Label records every
serving in the image info), so two annotators working at once never get the same volume.

- ``representative``: for the first labels, from an unlabelled datastore on: the image most like the rest of
  the pool (its medoid under the correlation of affinely aligned thumbnails, :mod:`semisam_o1.representative`),
  then the one that, labelled too, leaves the pool closest to its nearest labelled image (greedy k-medoids). No
  model and no encoder: seconds for a small pool, minutes for 200 images the first time, then cached.
- ``uncertain``: highest current uncertainty score (:mod:`semisam_o1.tasks.uncertainty_scoring`)
  first; images not scored yet come after every scored one. Unlike MONAI Label's ``Epistemic``,
  the ranking is what decides.
- ``diverse``: k-center greedy in foundation-feature space: the candidate whose global descriptor
  (:func:`~semisam_o1.active_learning.volume_descriptor` of its cached features) is farthest from
  every labelled volume. No model needed; with no label yet, the most typical volume.
- ``uncertain_diverse``: among the most uncertain quarter of the candidates, the one farthest from
  the labelled volumes (:func:`~semisam_o1.active_learning.uncertain_then_diverse`).
"""

from __future__ import annotations

import logging

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from semisam_o1.active_learning import (
    SCORE_KEY,
    distance_to_labelled,
    recently_served,
    uncertain_then_diverse,
    volume_descriptor,
)
from semisam_o1.representative import Thumbnails, most_representative
from semisam_o1.stage_one.predictor import StageOne
from semisam_o1.safe_names import public
from semisam_o1.volumes import load_image

logger = logging.getLogger(__name__)


class PoolStrategy(Strategy):
    """Common part: fresh datastore info, candidate filtering, the answer's shape.

    Subclasses implement :meth:`rank`: ``{image_id: (value, why)}``, the highest value is served.
    """

    def __init__(self, description: str, skip_seconds: float):
        super().__init__(description)
        self.skip_seconds = skip_seconds

    def rank(self, candidates: list[str], datastore: Datastore) -> dict[str, tuple[float, str]]:
        raise NotImplementedError

    def __call__(self, request, datastore: Datastore):
        datastore.refresh()  # scores and servings are written by job subprocesses and other requests
        client_id = request.get("client_id")
        unlabelled = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))
        candidates = [i for i in unlabelled if not recently_served(datastore.get_image_info(i), client_id, self.skip_seconds)]
        if not candidates:
            logger.info(f"{request.get('strategy')}: no image left to serve ({len(unlabelled)} unlabelled, all served recently)")
            return None
        ranked = self.rank(candidates, datastore)
        image_id = max(candidates, key=lambda i: ranked[i][0])  # ties: the first id
        value, why = ranked[image_id]
        logger.info(f"{request.get('strategy')}: {image_id} ({why}); {len(candidates)} candidates")
        return {"id": image_id, "value": value, "why": why, "candidates": len(candidates)}


class Representative(PoolStrategy):
    """Ranks every candidate by the pool coverage it would give as the next label (see the module docstring).

    The whole datastore is the pool (labelled images included); an image that cannot be read is never served."""

    def __init__(self, stage_one: StageOne, skip_seconds: float):
        super().__init__("The image most like the rest of the pool (the best first template); then the one covering the pool best", skip_seconds)
        self.stage_one = stage_one
        self._thumbnails: Thumbnails | None = None

    def rank(self, candidates, datastore):
        modality = self.stage_one.cache.plan.modality
        if self._thumbnails is None or self._thumbnails.modality != modality:
            self._thumbnails = Thumbnails(modality)
        paths = {i: datastore.get_image_uri(i) for i in datastore.list_images()}
        labelled = tuple(datastore.get_labeled_images(DefaultLabelTag.FINAL))
        ranked = dict(most_representative(paths, modality, labelled, self._thumbnails))
        unreadable = self._thumbnails.unreadable
        for i in unreadable:
            logger.warning(f"representative: {i} left out: {public(unreadable[i])}")
        labelled = tuple(i for i in labelled if i not in unreadable)
        pool = len(paths) - len(unreadable)
        out = {}
        for i in candidates:
            if i not in ranked:
                out[i] = (float("-inf"), "unreadable image" if i in unreadable else "not rankable")
            elif not labelled:
                out[i] = (-ranked[i], f"the pool's most representative image (mean aligned distance {ranked[i]:.3f} to the "
                                      f"{pool} image(s) of the pool): annotate it first")
            else:
                out[i] = (-ranked[i], f"with the {len(labelled)} labelled image(s), covers the pool best (mean distance {ranked[i]:.3f})")
        return out


def scores_of(candidates: list[str], datastore: Datastore) -> dict[str, float | None]:
    """Current uncertainty score of each candidate (``None`` if never scored)."""
    return {i: datastore.get_image_info(i).get(SCORE_KEY, {}).get("score") for i in candidates}


class Uncertain(PoolStrategy):
    def __init__(self, skip_seconds: float):
        super().__init__("Highest uncertainty score first (run the 'uncertainty' scoring method to refresh)", skip_seconds)

    def rank(self, candidates, datastore):
        out = {}
        for i, score in scores_of(candidates, datastore).items():
            out[i] = (score, f"highest uncertainty score {score}") if score is not None else (-1.0, "no uncertainty score yet")
        return out


class Diverse(PoolStrategy):
    """Needs each candidate's cached features (encodes any image not cached yet)."""

    def __init__(self, stage_one: StageOne, skip_seconds: float,
                 description: str = "Farthest from every labelled volume in foundation-feature space (k-center greedy)"):
        super().__init__(description, skip_seconds)
        self.stage_one = stage_one
        self._descriptors: dict[str, np.ndarray] = {}

    def descriptor(self, path: str) -> np.ndarray:
        if path not in self._descriptors:
            self._descriptors[path] = volume_descriptor(self.stage_one.cache.get_or_compute(load_image(path)))
        return self._descriptors[path]

    def distances(self, candidates: list[str], datastore: Datastore) -> np.ndarray:
        """``(N,)`` distance of each candidate to the nearest labelled volume (see :func:`distance_to_labelled`)."""
        labelled = sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL))
        cand = np.stack([self.descriptor(datastore.get_image_uri(i)) for i in candidates])
        lab = np.stack([self.descriptor(datastore.get_image_uri(i)) for i in labelled]) if labelled else np.zeros((0, cand.shape[1]))
        return distance_to_labelled(cand, lab)

    def rank(self, candidates, datastore):
        distances = self.distances(candidates, datastore)
        if not datastore.get_labeled_images(DefaultLabelTag.FINAL):
            return {i: (float(d), "most typical volume of the pool (no label yet)") for i, d in zip(candidates, distances)}
        return {i: (float(d), f"farthest from the labelled volumes (distance {d:.2f})") for i, d in zip(candidates, distances)}


class UncertainDiverse(Diverse):
    def __init__(self, stage_one: StageOne, skip_seconds: float):
        super().__init__(stage_one, skip_seconds, "Among the most uncertain quarter, the farthest from the labelled volumes")

    def rank(self, candidates, datastore):
        scores = scores_of(candidates, datastore)
        ranked = uncertain_then_diverse([scores[i] for i in candidates], self.distances(candidates, datastore))
        return dict(zip(candidates, ranked))
