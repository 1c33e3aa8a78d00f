"""Batch infer over the unlabelled pool that saves pseudo-labels under a tag that is never ``final``."""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

#: Tag of machine-made labels; ``final`` is reserved for clinicians.
PSEUDO_TAG = "pseudo"


def refuse_final(tag: str | None) -> None:
    """A model's output is never saved as ``final`` (it would overwrite or pose as a clinician's label)."""
    if tag == DefaultLabelTag.FINAL:
        raise HTTPException(status_code=409, detail="model output is never saved with tag 'final'; use e.g. 'pseudo'")


class PseudoLabelBatchInfer(BatchInferTask):
    """``POST /batch/infer/<model>``: by default every image without a ``final`` label, tag ``pseudo``."""

    def get_images(self, request, datastore: Datastore):
        if request.get("images", BatchInferImageType.IMAGES_UNLABELED) == BatchInferImageType.IMAGES_UNLABELED:
            return datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        return super().get_images(request, datastore)

    def __call__(self, request, datastore: Datastore, infer):
        request = {"images": BatchInferImageType.IMAGES_UNLABELED, "label_tag": PSEUDO_TAG, "max_workers": 1, **request}
        refuse_final(request["label_tag"])
        return super().__call__(request, datastore, infer)
