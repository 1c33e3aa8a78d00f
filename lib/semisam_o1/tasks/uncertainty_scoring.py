"""Scoring method ``uncertainty``: one uncertainty score per unlabelled image, kept in the datastore.

``POST /scoring/uncertainty`` (and automatically after every training and at start-up, as MONAI
Label runs all scoring methods then). For every image without a ``final`` label it writes into the
image's info, under :data:`~semisam_o1.active_learning.SCORE_KEY`::

    {"score", "mean_uncertainty", "uncertain_fraction", "source": "stage2" | "stage1", "version", "ts"}

``source`` ``stage2``: the published stage-two network's predictive entropy (read from the maps its
own round wrote when the image was in that round's pool, else predicted). ``stage1`` (no network
yet): 1 - vote share of stage one's propagation from the current templates. ``version`` names the
model (network hash, or template labels + feature settings); an image whose score already has the
current version is skipped. Progress lines ``uncertainty n/N`` go to the job's details.
"""

from __future__ import annotations

import hashlib
import logging
import time

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from semisam_o1.active_learning import SCORE_KEY, UNCERTAIN_ENTROPY, UNCERTAIN_VOTE, uncertainty_score
from semisam_o1.priority import InteractivePriority, lower_job_priority
from semisam_o1.sample_data import sha256
from semisam_o1.stage_two import StageTwo
from semisam_o1.templates import Template, find_templates
from semisam_o1.volumes import InputError, load_image

logger = logging.getLogger(__name__)


def stage_one_version(templates: list[Template], settings_id: str) -> str:
    """Version of stage one's predictions: the template labels' contents and the feature settings."""
    digest = hashlib.sha256(settings_id.encode())
    for t in templates:
        digest.update(f"{t.image_id}:{sha256(t.label_path)}".encode())
    return f"stage1-{digest.hexdigest()[:12]}"


class UncertaintyScoring(ScoringMethod):
    def __init__(self, stage_two: StageTwo):
        super().__init__("Uncertainty of every unlabelled image under the latest model (active learning: strategy 'uncertain')")
        self.stage_two = stage_two
        self.priority = InteractivePriority(stage_two.studies)

    def __call__(self, request, datastore: Datastore):
        lower_job_priority()  # interactive requests first (semisam_o1.priority)
        stage_one = self.stage_two.stage_one
        templates = find_templates(datastore)
        net = self.stage_two.load_model()
        version = self.stage_two.model_version() if net is not None else stage_one_version(templates, stage_one.cache.settings_id)
        if net is None and not templates:
            return {"scored": 0, "current": 0, "version": None, "reason": "no template and no trained model yet"}
        saved = self.stage_two.published_round() if net is not None else None  # its own maps: no prediction needed
        image_ids = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))
        scored, current, failed = 0, 0, {}
        for n, image_id in enumerate(image_ids, 1):
            if datastore.get_image_info(image_id).get(SCORE_KEY, {}).get("version") == version:
                current += 1
                continue
            self.priority.wait_turn()
            start = time.perf_counter()
            try:
                image = load_image(datastore.get_image_uri(image_id))
                if net is not None:
                    maps = self.stage_two.saved_uncertainty(saved, image, image_id) if saved else None
                    label, uncertainty = maps or self.stage_two.predict(net, image)
                    summary = uncertainty_score(uncertainty, label, UNCERTAIN_ENTROPY)
                else:
                    prediction = stage_one.predict(image.path, templates)
                    summary = uncertainty_score(1.0 - prediction.confidence, prediction.label, UNCERTAIN_VOTE)
            except InputError as e:  # one bad file must not stop the pool
                failed[image_id] = str(e)
                logger.warning(f"uncertainty {n}/{len(image_ids)} {image_id}: skipped: {e}")
                continue
            entry = {**summary, "source": "stage2" if net is not None else "stage1", "version": version, "ts": int(time.time())}
            datastore.update_image_info(image_id, {SCORE_KEY: entry})
            scored += 1
            logger.info(f"uncertainty {n}/{len(image_ids)} {image_id} score {entry['score']} ({time.perf_counter() - start:.1f} s)")
        return {"scored": scored, "current": current, "failed": failed, "version": version}
