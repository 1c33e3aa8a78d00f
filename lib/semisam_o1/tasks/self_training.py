"""Train task ``semisam_o1``: stage two's rounds as a MONAI Label background training job.

``POST /train/semisam_o1`` runs :class:`~semisam_o1.stage_two.rounds.StageTwo` in MONAI Label's job
subprocess; progress lines (round, phase, iteration, loss, voxels refined) go to the job's
``details`` (``GET /train/``) and :meth:`stats` reports the finished rounds (``/info/``).
Request keys override ``--conf``: ``rounds``, ``iterations``, ``refinement``, ``publish``. The
stats and the job's result name the published round and why it was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from semisam_o1.config import AppConfig
from semisam_o1.parsers import ConfError
from semisam_o1.pool import readable_pool, record_unreadable, save_published_labels
from semisam_o1.research import parse_typed, research_field
from semisam_o1.server.errors import client_errors
from semisam_o1.stage_two.rounds import Progress, StageTwo
from semisam_o1.templates import find_templates

logger = logging.getLogger(__name__)

#: Request keys that override ``--conf`` for one training run.
OPTIONS = ("rounds", "iterations", "refinement", "publish", "pseudo_templates", "boundary", "replace_confidence")
#: those of :data:`OPTIONS` that are operator options; the others are ``stage_two`` research settings
OPERATOR = ("rounds", "iterations")


class SelfTraining(TrainTask):
    def __init__(self, stage_two: StageTwo):
        super().__init__("SemiSAM-O1 stage two: rounds of training (each on from the last round's network) and ensembled soft labels with uncertainty (feature-space refinement: refinement voxel)")
        self.stage_two = stage_two

    def config(self):
        p = self.stage_two.params
        return {"rounds": p.rounds, "iterations": p.train.iterations, "refinement": p.refinement, "publish": p.publish,
                "pseudo_templates": p.pseudo_templates, "boundary": p.boundary, "replace_confidence": p.replace_confidence}

    def stats(self):
        state = self.stage_two.state()
        return {"rounds_done": len(state["rounds"]), "model": str(self.stage_two.model_path) if state["rounds"] else None, **StageTwo.summary(state)}

    def options(self, request) -> dict:
        """The request's overrides (:data:`OPTIONS` keys present), parsed as their ``--conf`` options.

        The server calls this before it queues the job (:mod:`~semisam_o1.server.request_guard`), so a
        bad value is a 422 answer, never a failed job.

        Raises:
            ConfError: naming the key and the problem.
        """
        out = {}
        for key in (k for k in OPTIONS if k in request):
            try:
                out[key] = AppConfig.parse_option(key, request[key]) if key in OPERATOR else parse_typed(research_field(f"stage_two.{key}"), request[key])
            except ConfError as e:
                raise ConfError(str(e) if key in OPERATOR else f"{key}: {e}") from None
        return out

    def _with_request(self, request) -> StageTwo:
        p = self.stage_two.params
        o = self.options(request)
        train = dataclasses.replace(p.train, iterations=o.get("iterations", p.train.iterations))
        params = dataclasses.replace(p, rounds=o.get("rounds", p.rounds), train=train, refinement=o.get("refinement", p.refinement),
                                     publish=o.get("publish", p.publish), pseudo_templates=o.get("pseudo_templates", p.pseudo_templates),
                                     boundary=o.get("boundary", p.boundary), replace_confidence=o.get("replace_confidence", p.replace_confidence))
        return StageTwo(self.stage_two.studies, self.stage_two.stage_one, params)

    def __call__(self, request, datastore: Datastore):
        with client_errors():
            stage_two = self._with_request(request)
            templates = find_templates(datastore)
            pool = {i: datastore.get_image_uri(i) for i in sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))}
            pool, skipped = readable_pool(pool)  # a file put in the folder by hand that cannot be read: skipped, named
            record_unreadable(stage_two.studies, "training", skipped)
            for image_id, reason in skipped.items():
                logger.warning(f"stage2: skipping {image_id}: {reason}")

            def report(p: Progress) -> None:
                logger.info(f"stage2 round {p.round}/{p.rounds} {p.phase} iteration {p.iteration}/{p.iterations} loss {p.loss}")
                if p.history and p.phase == "refine":
                    logger.info(f"stage2 round stats {json.dumps(p.history[-1])}")

            state = stage_two.run(templates, pool, on_progress=report)
        save_published_labels(datastore, stage_two, state, pool)
        return {**StageTwo.summary(state), "skipped": skipped}
