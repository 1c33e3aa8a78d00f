"""Scoring method ``features``: the whole pool's stage-one caches, as a MONAI Label background job.

Encodes every image once (foundation features) and registers every template to it, so that later
infer calls only read caches. Progress lines (``features 3/20 ...``) appear in the job's status
(``GET /scoring/``, ``details``). Also runs once when the server starts (MONAI Label runs every
scoring method at start-up unless ``MONAI_LABEL_AUTO_UPDATE_SCORING=false``).

Interactive requests go first (:mod:`semisam_o1.priority`): the job process runs at a lowered CPU
priority and, before each image, waits while the server serves an infer request; two processes
never encode the same image at once (the feature cache locks each image's miss).
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from semisam_o1.priority import InteractivePriority, lower_job_priority
from semisam_o1.stage_one import StageOne
from semisam_o1.templates import find_templates
from semisam_o1.volumes import InputError, load_image

logger = logging.getLogger(__name__)


class FeatureExtraction(ScoringMethod):
    def __init__(self, stage_one: StageOne):
        super().__init__("Encode every image once with the foundation model and align the templates (stage-one caches)")
        self.stage_one = stage_one
        self.priority = InteractivePriority(stage_one.studies)

    def __call__(self, request, datastore: Datastore):
        lower_job_priority()
        image_ids = sorted(datastore.list_images())
        templates = find_templates(datastore)
        done, failed = [], {}
        waited = 0.0
        for n, image_id in enumerate(image_ids, 1):
            waited += self.priority.wait_turn()
            start = time.perf_counter()
            path = datastore.get_image_uri(image_id)
            try:
                self.stage_one.cache.get_or_compute(load_image(path))
                for template in templates:
                    for method in self.stage_one.methods:
                        self.stage_one.transform(path, template.image_path, method)
                done.append(image_id)
            except InputError as e:  # one bad file must not stop the pool
                failed[image_id] = str(e)
                logger.warning(f"features {n}/{len(image_ids)} {image_id}: skipped: {e}")
                continue
            logger.info(f"features {n}/{len(image_ids)} {image_id} ({time.perf_counter() - start:.1f} s)")
        return {"encoded": len(done), "failed": failed, "settings": self.stage_one.cache.settings_id,
                "waited_for_interactive_seconds": round(waited, 1)}
