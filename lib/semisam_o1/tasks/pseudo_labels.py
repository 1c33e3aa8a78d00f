"""Batch infer over the unlabelled pool that saves pseudo-labels under a tag that is never ``final``."""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

from semisam_o1.volumes import InputError

#: Tag of machine-made labels; ``final`` is reserved for clinicians.
PSEUDO_TAG = "pseudo"


def refuse_final(tag: str | None) -> None:
    """A model's output is never saved as ``final`` (it would overwrite or pose as a clinician's label)."""
    if tag == DefaultLabelTag.FINAL:
        raise HTTPException(status_code=409, detail="model output is never saved with tag 'final'; use e.g. 'pseudo'")


class PseudoLabelBatchInfer(BatchInferTask):
    """``POST /batch/infer/<model>``: by default every image without a ``final`` label, tag ``pseudo``.

    A list in ``images`` must hold ids of the datastore's images (MONAI Label would read any server
    path given there): otherwise the job fails naming them.
    """

    def get_images(self, request, datastore: Datastore):
        images = request.get("images", BatchInferImageType.IMAGES_UNLABELED)
        if images == BatchInferImageType.IMAGES_UNLABELED:
            return datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        if isinstance(images, str):
            return super().get_images(request, datastore)
        known = set(datastore.list_images())
        unknown = [i for i in images if not isinstance(i, str) or i not in known]
        if unknown:
            raise InputError(f"batch infer images not in the datastore: {', '.join(repr(i) for i in unknown[:10])}")
        return images

    def __call__(self, request, datastore: Datastore, infer):
        request = {"images": BatchInferImageType.IMAGES_UNLABELED, "label_tag": PSEUDO_TAG, "max_workers": 1, **request}
        refuse_final(request["label_tag"])
        return super().__call__(request, datastore, infer)
