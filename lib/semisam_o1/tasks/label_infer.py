"""Common part of the app's segmentation infer tasks: live label names, result file in Slicer's format."""

from __future__ import annotations

import tempfile
from typing import Callable

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType


class LabelInfer(InferTask):
    """A SEGMENTATION task (the type 3D Slicer lists) whose label names follow the datastore's templates."""

    def __init__(self, description: str, labels: Callable[[], dict[str, int]]):
        super().__init__(type=InferType.SEGMENTATION, labels=labels(), dimension=3, description=description)
        self._labels = labels

    def info(self):
        self.labels = self._labels()
        return super().info()

    def is_valid(self) -> bool:
        return True

    @staticmethod
    def result_path(request) -> str:
        """A temporary file with the extension the client asked for (Slicer: ``.nrrd``; default ``.nii.gz``)."""
        suffix = request.get("result_extension") or ".nii.gz"
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        return tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
