"""MONAI Label app for SemiSAM-O1: wires the tasks of the ``semisam_o1`` library, nothing more."""

import logging
import os
import threading

import semisam_o1
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.dice import Dice
from semisam_o1 import label_curve
from semisam_o1.config import AppConfig, is_dicomweb
from semisam_o1.distributed import check_reachable
from semisam_o1.pool import build_stage_one, pool_runner, refresh_pseudo_labels, unreadable_images
from semisam_o1.server import request_guard
from semisam_o1.server.dicomweb import dicomweb_datastore, work_dir
from semisam_o1.server.errors import client_errors
from semisam_o1.server.jobs import exit_with_parent, in_job_process
from semisam_o1.server.priority import InteractivePriority
from semisam_o1.server.safe_datastore import SafeSessions
from semisam_o1.server.template_datastore import TemplateDatastore
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.tasks.feature_extraction import FeatureExtraction
from semisam_o1.tasks.network_infer import NetworkInfer
from semisam_o1.tasks.pseudo_labels import PseudoLabelBatchInfer, refuse_final
from semisam_o1.tasks.self_training import SelfTraining
from semisam_o1.tasks.stage_one_infer import StageOneInfer
from semisam_o1.tasks.strategies import Diverse, Representative, Uncertain, UncertainDiverse
from semisam_o1.tasks.template_refresh import PseudoLabelRefresher
from semisam_o1.tasks.uncertainty_scoring import UncertaintyScoring
from semisam_o1.templates import STAGE_ONE_MODEL, find_templates, label_map
from semisam_o1.volumes import check_image_file

logger = logging.getLogger(__name__)


class SemiSAMO1App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        if in_job_process():
            exit_with_parent()  # a background job ends with its server, even after kill -9
        self.config = AppConfig.from_conf(conf)
        check_reachable(self.config.ray_address)  # a Ray cluster that is not there: a start-up error naming it
        self._infer_lock = threading.Lock()
        self.stage_one = build_stage_one(work_dir(studies), self.config)
        self.stage_two = StageTwo(work_dir(studies), self.stage_one, self.config.stage_two_params())
        self.priority = InteractivePriority(self.stage_one.studies)
        self.refresher = PseudoLabelRefresher(self.stage_one, self.datastore, self.current_labels, self.config)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SemiSAM-O1",
            description="One labelled template volume -> segmentations of the whole study pool "
            "(foundation-feature propagation + self-training with feature-space refinement)",
            version=semisam_o1.__version__,
        )
        request_guard.install(self, {"semisam_o1"}, lambda: bool(find_templates(self.datastore())))

    def init_remote_datastore(self):
        """``--studies http(s)://...``: DICOMweb (e.g. Orthanc) with DICOM SEG by pydicom-seg, never dcmqi."""
        return dicomweb_datastore(self.studies, self.current_labels)

    def current_labels(self) -> dict[str, int]:
        """Label map from the datastore's templates and ``--conf labels`` (re-read as templates change)."""
        return label_map(find_templates(self.datastore()), self.config.labels)

    def _load_sessions(self, load=False):
        """MONAI Label's upload sessions, with checked session ids and safe unpacking."""
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY) if load else None

    def init_infers(self):
        return {
            STAGE_ONE_MODEL: StageOneInfer(self.stage_one, self.datastore, self.current_labels),
            "semisam_o1": NetworkInfer(self.stage_two, self.current_labels, self.datastore),
        }

    def init_trainers(self):
        return {"semisam_o1": SelfTraining(self.stage_two)}

    def init_batch_infer(self):
        return PseudoLabelBatchInfer(self._batch_on_ray if self.config.ray_address else None)

    def _batch_on_ray(self, image_ids: list[str], tag: str) -> dict:
        """The stage-one model's batch infer as Ray tasks: ``{image_id: summary}`` (failed images: ``{}``)."""
        failed: dict[str, str] = {}
        with pool_runner(self.stage_one.studies, self.config) as runner:
            done = refresh_pseudo_labels(self.stage_one, self.datastore(), self.current_labels(), errors=failed, runner=runner,
                                         config=self.config, image_ids=image_ids, tag=tag)
        return {i: done.get(i, {}) for i in image_ids}

    def init_datastore(self):
        if is_dicomweb(self.studies):
            return super().init_datastore()
        return TemplateDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            label_values=lambda: set(self.config.labels.values()) or None,
        )

    def init_strategies(self):
        skip = self.config.skip_served_seconds
        return {
            "uncertain": Uncertain(skip),
            "representative": Representative(self.stage_one, skip),
            "diverse": Diverse(self.stage_one, skip),
            "uncertain_diverse": UncertainDiverse(self.stage_one, skip),
            "random": Random(),
            "first": First(),
        }

    def init_scoring_methods(self):
        return {"features": FeatureExtraction(self.stage_one, self.config), "uncertainty": UncertaintyScoring(self.stage_two, self.config), "dice": Dice()}

    def on_save_label(self, image_id, label_id):
        """A new ``final`` label is a template: its image's pseudo-label is scored against it (:mod:`semisam_o1.label_curve`),
        then the pool's stage-one pseudo-labels are refreshed in the background."""
        datastore = self.datastore()
        if image_id not in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            return {}
        try:
            label_curve.record_saved_label(datastore, work_dir(self.studies), image_id, label_map(find_templates(datastore), self.config.labels))
        except Exception as e:  # noqa: BLE001 - the curve is advice: a failure never fails the clinician's save
            logger.warning(f"label curve: {image_id} not scored: {e}")
        self.refresher.request()
        return {"template": image_id, "templates": len(find_templates(self.datastore())), "pseudo_label_refresh": "started"}

    def infer(self, request, datastore=None):
        """MONAI Label's infer; a datastore image's id also reaches the task as ``image_id`` (MONAI Label
        replaces ``image`` by the file's path). Background pool work pauses while it runs (:mod:`semisam_o1.server.priority`).
        Infers run one at a time (they are CPU/GPU-bound, and MONAI Label's infer tasks keep per-call state);
        other requests (listings, saves, next sample) are served meanwhile on their own threads."""
        refuse_final(request.get("label_tag"))
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):  # MONAI Label's own test for "an id, not a file"
            request = {**request, "image_id": image}
        elif isinstance(image, str) and os.path.isfile(image):  # an uploaded file or a session's image
            with client_errors():
                check_image_file(image, "the uploaded image")
        with self._infer_lock, self.priority.interactive():
            return super().infer(request, datastore)

    def info(self):
        self.labels = self.current_labels()
        info = super().info()
        info["semisam"] = {"templates": [t.image_id for t in find_templates(self.datastore())], "pseudo_label_refresh": self.refresher.status(),
                           "unreadable_images": unreadable_images(work_dir(self.studies)), "label_curve": label_curve.summary(work_dir(self.studies)),
                           **self.config.describe()}
        return info
