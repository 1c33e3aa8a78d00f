"""Scoring method ``uncertainty``: one uncertainty score per unlabelled image, kept in the datastore.

``POST /scoring/uncertainty`` (and automatically after every training and at start-up, as MONAI
Label runs all scoring methods then). For every image without a ``final`` label it writes into the
image's info, under :data:`~semisam_o1.active_learning.SCORE_KEY`::

    {"score", "mean_uncertainty", "uncertain_fraction", "source": "stage2" | "stage1", "version", "ts"}

``source`` ``stage2``: the published stage-two network's predictive entropy (read from the maps its
own round wrote when the image was in that round's pool, else predicted). ``stage1`` (no network
yet): 1 - vote share of stage one's propagation from the current templates. ``version`` names the
model (network hash, or template labels + stage one's settings: features, prior, propagation and their params); an image whose score already has the
current version is skipped. Progress lines ``uncertainty n/N`` go to the job's details. With
``--conf ray_address`` each image is scored by a Ray task (:func:`score_image`); this process writes the scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from semisam_o1.active_learning import SCORE_KEY, UNCERTAIN_ENTROPY, UNCERTAIN_VOTE, uncertainty_score
from semisam_o1.config import AppConfig
from semisam_o1.pool import pool_runner, stage_two_of
from semisam_o1.server.priority import InteractivePriority, lower_job_priority
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.templates import Template, find_templates
from semisam_o1.volumes import InputError, load_image, sha256

logger = logging.getLogger(__name__)


def stage_one_version(templates: list[Template], settings: dict) -> str:
    """Version of stage one's predictions: the template labels' contents and ``settings``
    (:meth:`~semisam_o1.stage_one.predictor.StageOne.settings`: features, spatial prior, propagation and their params)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in templates:
        digest.update(f"{t.image_id}:{sha256(t.label_path)}".encode())
    return f"stage1-{digest.hexdigest()[:12]}"


def score_image(item: tuple[str, str], source, templates: list[Template], with_network: bool) -> dict:
    """One image's uncertainty summary (see the module docstring), ``item`` = ``(image_id, image path)``;
    ``source`` a :class:`StageTwo`, or ``(studies, config)`` in a Ray worker (:func:`~semisam_o1.pool.stage_two_of`)."""
    image_id, path = item
    two = stage_two_of(source)
    image = load_image(path)
    if with_network:
        net = two.load_model()
        saved = two.published_round()  # its own maps: no prediction needed
        maps = two.saved_uncertainty(saved, image, image_id) if saved else None
        label, uncertainty = maps or two.predict(net, image)
        return uncertainty_score(uncertainty, label, UNCERTAIN_ENTROPY)
    prediction = two.stage_one.predict(image.path, templates)
    return uncertainty_score(1.0 - prediction.confidence, prediction.label, UNCERTAIN_VOTE)


class UncertaintyScoring(ScoringMethod):
    """With ``--conf ray_address``, every image is a Ray task; scores are written here."""

    def __init__(self, stage_two: StageTwo, config: AppConfig = AppConfig()):
        super().__init__("Uncertainty of every unlabelled image under the latest model (active learning: strategy 'uncertain')")
        self.stage_two = stage_two
        self.config = config
        self.priority = InteractivePriority(stage_two.studies)

    def __call__(self, request, datastore: Datastore):
        lower_job_priority()  # interactive requests first (semisam_o1.server.priority)
        templates = find_templates(datastore)
        net = self.stage_two.load_model()
        version = self.stage_two.model_version() if net is not None else stage_one_version(templates, self.stage_two.stage_one.settings())
        if net is None and not templates:
            return {"scored": 0, "current": 0, "version": None, "reason": "no template and no trained model yet"}
        image_ids = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))
        todo = [(i, datastore.get_image_uri(i)) for i in image_ids if datastore.get_image_info(i).get(SCORE_KEY, {}).get("version") != version]
        current, scored, failed = len(image_ids) - len(todo), 0, {}
        with pool_runner(self.stage_two.studies, self.config) as runner:
            source = (self.stage_two.studies.resolve(), self.config) if runner.distributed else self.stage_two
            results = runner.map(score_image, todo, source, templates, net is not None, before_each=self.priority.wait_turn)
            for n, ((image_id, _), summary, error) in enumerate(results, current + 1):
                if error is not None and not isinstance(error, InputError):
                    raise error
                if error is not None:  # one bad file must not stop the pool
                    failed[image_id] = str(error)
                    logger.warning(f"uncertainty {n}/{len(image_ids)} {image_id}: skipped: {error}")
                    continue
                entry = {**summary, "source": "stage2" if net is not None else "stage1", "version": version, "ts": int(time.time())}
                datastore.update_image_info(image_id, {SCORE_KEY: entry})
                scored += 1
                logger.info(f"uncertainty {n}/{len(image_ids)} {image_id} score {entry['score']}")
        return {"scored": scored, "current": current, "failed": failed, "version": version}
