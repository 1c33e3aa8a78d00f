"""Infer task ``semisam_stage_one``: stage-one propagation of the templates' labels to one image."""

from __future__ import annotations

import time
from typing import Callable

from monailabel.interfaces.datastore import Datastore

from semisam_o1.server.errors import client_errors
from semisam_o1.stage_one.predictor import StageOne
from semisam_o1.tasks.label_infer import LabelInfer
from semisam_o1.templates import find_templates
from semisam_o1.volumes import save_label


class StageOneInfer(LabelInfer):
    """Label file (in the image's geometry) + JSON with per-class volumes and mean confidence.

    Request keys used: ``image`` (path, set by MONAI Label), ``result_extension`` (default
    ``.nii.gz``; Slicer sends ``.nrrd``). The label is saved by MONAI Label under ``label_tag``
    (never ``final``: the app refuses that).
    """

    def __init__(self, stage_one: StageOne, datastore: Callable[[], Datastore], labels: Callable[[], dict[str, int]]):
        super().__init__("SemiSAM-O1 stage one: template labels propagated by registration-guided foundation-feature label fusion (no training)", labels)
        self.stage_one = stage_one
        self._datastore = datastore

    def __call__(self, request):
        start = time.perf_counter()
        with client_errors():
            templates = find_templates(self._datastore())
            prediction = self.stage_one.predict(request["image"], templates)
            out = str(save_label(prediction.label, prediction.image, self.result_path(request)))
        labels = self._labels()
        result = {
            "label_names": labels,
            **prediction.summary(labels),
            "templates": [t.image_id for t in templates],
            "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
        return out, result
