"""MONAI Label app for SemiSAM-O1: wires the tasks of the ``semisam_o1`` library, nothing more."""

import logging

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.dice import Dice

import semisam_o1
from semisam_o1.config import AppConfig
from semisam_o1.templates import find_templates, label_map

logger = logging.getLogger(__name__)


class SemiSAMO1App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.config = AppConfig.from_conf(conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SemiSAM-O1",
            description="One labelled template volume -> segmentations of the whole study pool "
            "(foundation-feature propagation + self-training with feature-space refinement)",
            version=semisam_o1.__version__,
        )

    def current_labels(self) -> dict[str, int]:
        """Label map from the datastore's templates and ``--conf labels`` (re-read as templates change)."""
        return label_map(find_templates(self.datastore()), self.config.labels)

    def init_strategies(self):
        return {"random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"dice": Dice()}

    def info(self):
        self.labels = self.current_labels()
        return super().info()
