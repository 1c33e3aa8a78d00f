"""Common part of the app's segmentation infer tasks: live label names, result file in Slicer's format."""

from __future__ import annotations

import tempfile
from typing import Callable

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from semisam_o1.safe_names import result_suffix


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

    @classmethod
    def result_path(cls, request) -> str:
        """A temporary file with the extension the client asked for (Slicer: ``.nrrd``), see :func:`~semisam_o1.safe_names.result_suffix`."""
        return tempfile.NamedTemporaryFile(suffix=result_suffix(request), delete=False).name
