"""Batch infer over the unlabelled pool that saves pseudo-labels under a tag that is never ``final``."""

from __future__ import annotations

from typing import Callable

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

from semisam_o1.templates import PSEUDO_TAG, STAGE_ONE_MODEL
from semisam_o1.volumes import InputError


def refuse_final(tag: str | None) -> None:
    """A model's output is never saved as ``final`` (it would overwrite or pose as a clinician's label)."""
    if tag == DefaultLabelTag.FINAL:
        raise HTTPException(status_code=409, detail="model output is never saved with tag 'final'; use e.g. 'pseudo'")


class PseudoLabelBatchInfer(BatchInferTask):
    """``POST /batch/infer/<model>``: every image without a ``final`` label (``images`` ``all``, MONAI
    Label's default, or ``unlabeled``), saved under tag ``pseudo`` (also when MONAI Label's REST default
    tag ``original`` comes in). A template's label is the clinician's: no machine label is made beside
    it unless its id is listed in ``images``.

    A list in ``images`` must hold ids of the datastore's images (MONAI Label would read any server
    path given there): otherwise the job fails naming them. With ``--conf ray_address`` the stage-one
    model's batch runs as Ray tasks (one per image); the network's runs here, one image at a time.
    """

    def __init__(self, distributed: Callable[[list[str], str], dict] | None = None):
        """``distributed(image_ids, tag)``: the stage-one model's batch over the pool's Ray workers
        (``--conf ray_address``; :func:`~semisam_o1.pool.refresh_pseudo_labels`), else ``None``."""
        self.distributed = distributed

    def get_images(self, request, datastore: Datastore):
        images = request.get("images", BatchInferImageType.IMAGES_UNLABELED)
        if images == BatchInferImageType.IMAGES_UNLABELED:
            return datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        if isinstance(images, str):  # "all" (MONAI Label's REST default) and "labeled": never the templates
            finals = set(datastore.get_labeled_images(DefaultLabelTag.FINAL))
            return [i for i in super().get_images(request, datastore) if i not in finals]
        known = set(datastore.list_images())
        unknown = [i for i in images if not isinstance(i, str) or i not in known]
        if unknown:
            raise InputError(f"batch infer images not in the datastore: {', '.join(repr(i) for i in unknown[:10])}")
        return images

    def __call__(self, request, datastore: Datastore, infer):
        request = {"images": BatchInferImageType.IMAGES_UNLABELED, "max_workers": 1, **request}
        # MONAI Label's REST default tag is "original" (POST without a body): machine labels here are "pseudo"
        request["label_tag"] = PSEUDO_TAG if request.get("label_tag") in (None, DefaultLabelTag.ORIGINAL) else request["label_tag"]
        refuse_final(request["label_tag"])
        if self.distributed is not None and request.get("model") == STAGE_ONE_MODEL:
            return self.distributed(sorted(self.get_images(request, datastore)), request["label_tag"])
        return super().__call__(request, datastore, infer)
