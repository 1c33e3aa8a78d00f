"""Common part of the app's segmentation infer tasks: live label names, result file in Slicer's format."""

from __future__ import annotations

import tempfile
from typing import Callable

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from semisam_o1.safe_names import safe_name


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
    def result_suffix(request) -> str:
        """The result file's extension the client asked for (``result_extension``; default ``.nii.gz``).

        Raises:
            UnsafeNameError: the extension would not make a plain file name (e.g. holds a separator).
        """
        suffix = str(request.get("result_extension") or ".nii.gz")
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        safe_name("result_extension", f"result{suffix}")
        return suffix

    @classmethod
    def result_path(cls, request) -> str:
        """A temporary file with the extension the client asked for (Slicer: ``.nrrd``), see :meth:`result_suffix`."""
        return tempfile.NamedTemporaryFile(suffix=cls.result_suffix(request), delete=False).name
