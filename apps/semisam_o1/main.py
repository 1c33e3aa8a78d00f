"""MONAI Label app for SemiSAM-O1: wires the tasks of the ``semisam_o1`` library, nothing more."""

import logging

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.dice import Dice

import semisam_o1
from semisam_o1.config import AppConfig
from semisam_o1.dicom import dicomweb_datastore, work_dir
from semisam_o1.pipeline import build_stage_one
from semisam_o1.stage_two import StageTwo
from semisam_o1.tasks import train_guard
from semisam_o1.tasks.feature_extraction import FeatureExtraction
from semisam_o1.tasks.network_infer import NetworkInfer
from semisam_o1.tasks.prototype_infer import PrototypeInfer
from semisam_o1.tasks.pseudo_labels import PseudoLabelBatchInfer, refuse_final
from semisam_o1.tasks.self_training import SelfTraining
from semisam_o1.templates import find_templates, label_map

logger = logging.getLogger(__name__)


class SemiSAMO1App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.config = AppConfig.from_conf(conf)
        self.stage_one = build_stage_one(work_dir(studies), self.config)
        self.stage_two = StageTwo(work_dir(studies), self.stage_one, self.config.stage_two_params())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SemiSAM-O1",
            description="One labelled template volume -> segmentations of the whole study pool "
            "(foundation-feature propagation + self-training with feature-space refinement)",
            version=semisam_o1.__version__,
        )
        train_guard.install({"semisam_o1"}, lambda: bool(find_templates(self.datastore())))

    def init_remote_datastore(self):
        """``--studies http(s)://...``: DICOMweb (e.g. Orthanc) with DICOM SEG by pydicom-seg, never dcmqi."""
        return dicomweb_datastore(self.studies, self.current_labels)

    def current_labels(self) -> dict[str, int]:
        """Label map from the datastore's templates and ``--conf labels`` (re-read as templates change)."""
        return label_map(find_templates(self.datastore()), self.config.labels)

    def init_infers(self):
        return {
            "semisam_prototype": PrototypeInfer(self.stage_one, self.datastore, self.current_labels),
            "semisam_o1": NetworkInfer(self.stage_two, self.current_labels),
        }

    def init_trainers(self):
        return {"semisam_o1": SelfTraining(self.stage_two)}

    def init_batch_infer(self):
        return PseudoLabelBatchInfer()

    def init_strategies(self):
        return {"random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"features": FeatureExtraction(self.stage_one), "dice": Dice()}

    def infer(self, request, datastore=None):
        refuse_final(request.get("label_tag"))
        return super().infer(request, datastore)

    def info(self):
        self.labels = self.current_labels()
        return super().info()
