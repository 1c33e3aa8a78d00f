"""Scoring method ``features``: the whole pool's stage-one caches, as a MONAI Label background job.

Encodes every image once (foundation features) and registers every template to it, so that later
infer calls only read caches. Progress lines (``features 3/20 ...``) appear in the job's status
(``GET /scoring/``, ``details``). Also runs once when the server starts (MONAI Label runs every
scoring method at start-up unless ``MONAI_LABEL_AUTO_UPDATE_SCORING=false``).

Interactive requests go first (:mod:`semisam_o1.server.priority`): the job process runs at a lowered CPU
priority and, before each image, waits while the server serves an infer request; two processes
never encode the same image at once (the feature cache locks each image's miss).
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from semisam_o1.config import AppConfig
from semisam_o1.pool import pool_runner, prepare_pool, record_unreadable
from semisam_o1.server.priority import InteractivePriority, lower_job_priority
from semisam_o1.stage_one.predictor import StageOne

logger = logging.getLogger(__name__)


class FeatureExtraction(ScoringMethod):
    """With ``--conf ray_address``, every image is a Ray task (:mod:`semisam_o1.distributed`); the
    job's progress lines are the same."""

    def __init__(self, stage_one: StageOne, config: AppConfig = AppConfig()):
        super().__init__("Encode every image once with the foundation model and align the templates (stage-one caches)")
        self.stage_one = stage_one
        self.config = config
        self.priority = InteractivePriority(stage_one.studies)

    def __call__(self, request, datastore: Datastore):
        lower_job_priority()
        waited = [0.0]
        start = [time.perf_counter()]

        def wait_turn() -> None:
            waited[0] += self.priority.wait_turn()
            start[0] = time.perf_counter()

        def on_image(n: int, total: int, image_id: str, error) -> None:
            if error is not None:
                logger.warning(f"features {n}/{total} {image_id}: skipped: {error}")
            else:  # seconds since the previous image finished (or, in process, since its turn came)
                logger.info(f"features {n}/{total} {image_id} ({time.perf_counter() - start[0]:.1f} s)")
            start[0] = time.perf_counter()

        with pool_runner(self.stage_one.studies, self.config) as runner:
            done, failed = prepare_pool(self.stage_one, datastore, runner, self.config, before_image=wait_turn, on_image=on_image)
        record_unreadable(self.stage_one.studies, "features", failed)
        return {"encoded": len(done), "failed": failed, "settings": self.stage_one.cache.settings_id,
                "waited_for_interactive_seconds": round(waited[0], 1), "ray_address": self.config.ray_address}
