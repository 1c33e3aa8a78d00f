"""Infer task ``semisam_o1``: the latest stage-two network on one image, with its uncertainty."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore

from semisam_o1.active_learning import UNCERTAIN_ENTROPY
from semisam_o1.server.errors import client_errors
from semisam_o1.stage_two.network import check_network_file
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.tasks.label_infer import LabelInfer
from semisam_o1.volumes import atomic_write, class_volumes, load_image, save_label, sha256

#: Datastore label tag of the entropy maps kept by ``uncertainty: true`` requests.
UNCERTAINTY_TAG = "uncertainty"


class NetworkInfer(LabelInfer):
    """Label file in the image's geometry + JSON: per-class volumes, mean entropy, uncertain fraction.

    Request ``uncertainty: true`` on a datastore image also keeps the entropy map (float32, nats, the
    image's grid) in the datastore as that image's label with tag ``uncertainty``; the JSON names it
    (``"map": {"label": <image id>, "tag": "uncertainty"}``, fetch with ``GET /datastore/label``),
    ``null`` for an uploaded image. No server path is answered, and no temporary file is left behind.
    The image id comes as ``image_id`` in the request (the app adds it; MONAI Label passes the path).
    """

    def __init__(self, stage_two: StageTwo, labels: Callable[[], dict[str, int]], datastore: Callable[[], Datastore]):
        super().__init__("SemiSAM-O1 stage two: 3D network self-trained from one template", labels)
        self.stage_two = stage_two
        self._datastore = datastore
        self._model = None
        self._model_mtime = None

    def get_path(self, validate: bool = True) -> str | None:
        """The published network's file (``GET /model/semisam_o1`` downloads it); ``None`` before training when
        ``validate``."""
        path = self.stage_two.model_path
        return str(path) if path.exists() or not validate else None

    def replace_model(self, path: str) -> dict:
        """Serve the checkpoint at ``path`` instead of the published one, once it passed
        :func:`~semisam_o1.stage_two.network.check_network_file` against this server's labels (written atomically;
        a refused file leaves the served model as it was). Returns MONAI Label's answer: checksum and time.

        Raises:
            InputError: naming what is wrong with the file.
        """
        check_network_file(Path(path), 1 + max(self._labels().values(), default=0), "uploaded model")
        target = self.stage_two.model_path
        atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
        return {"checksum": f"SHA256:{sha256(target)}", "modified_time": int(target.stat().st_mtime)}

    def export_bundle(self, folder: Path) -> Path:
        """The published network as a MONAI Bundle in ``folder`` (``GET /model/semisam_o1/bundle``), labelled with this
        server's label map (:meth:`~semisam_o1.stage_two.published.PublishedModel.export_bundle`).

        Raises:
            NothingPublished: before any training."""
        return self.stage_two.export_bundle(Path(folder), self._labels())

    def _network(self):
        path = self.stage_two.model_path
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if mtime != self._model_mtime:
            self._model, self._model_mtime = self.stage_two.load_model(), mtime
        if self._model is None:
            raise HTTPException(status_code=409, detail="no stage-two model yet: run training first (POST /train/semisam_o1)")
        return self._model

    def __call__(self, request):
        start = time.perf_counter()
        net = self._network()
        with client_errors():
            image = load_image(request["image"])
            label, entropy = self.stage_two.predict(net, image)
            out = self.result_path(request)
            save_label(label, image, out)
        names = self._labels()
        result = {
            "label_names": names,
            "classes": class_volumes(label, image, names),
            "uncertainty": {"mean_entropy": round(float(entropy.mean()), 4), "uncertain_fraction": round(float((entropy > UNCERTAIN_ENTROPY).mean()), 4)},
            "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
        if request.get("uncertainty"):
            result["uncertainty"]["map"] = self._keep_map(request.get("image_id"), entropy, image)
        return out, result

    def _keep_map(self, image_id: str | None, entropy: np.ndarray, image) -> dict | None:
        if not image_id:
            return None
        with tempfile.TemporaryDirectory() as tmp:  # the datastore copies it in under its own name
            path = save_label(entropy, image, Path(tmp) / "entropy.nii.gz", dtype=np.float32)
            self._datastore().save_label(image_id, str(path), UNCERTAINTY_TAG, {"model": "semisam_o1"})
        return {"label": image_id, "tag": UNCERTAINTY_TAG}
