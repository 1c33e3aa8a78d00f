"""Checks that answer a client's mistake with a 4xx before MONAI Label's endpoints run the request.

MONAI Label 0.8.5 answers 500 for an unknown model, strategy or scoring method and for malformed
``params``, and queues a training or scoring job without checking it (the job fails later). Its
route handlers call module-level functions of ``monailabel.endpoints.*`` that are looked up at call
time, so :func:`install` wraps those functions (installing again re-wraps the originals, for the
newest app):

- unknown model (``/infer``, ``/batch/infer``), strategy (``/activelearning``), scoring method
  (``/scoring``) or trainer (``/train``) -> 404 naming it and listing the known ones;
- ``POST /infer/<model>``: ``params`` must be a JSON object, its ``result_extension`` a plain
  extension (422); the image (``image``, or ``image`` inside ``params``) and ``session_id`` must be
  safe names (:func:`~semisam_o1.safe_names.safe_name`, 422: MONAI Label would otherwise read any
  existing server path given as ``image``); an image not in the datastore -> 404 naming it; no
  image, file or session -> 422; ``output=dicom_seg`` without a DICOMweb datastore -> 422;
- ``POST /train/<model>``: the trainer's request options (``options(params)``, e.g.
  :meth:`~semisam_o1.tasks.self_training.SelfTraining.options`) are parsed first (422 naming the
  option); a model in ``needs_template`` without a template -> 409; a second run while one is
  submitted or running -> 429 (MONAI Label refuses it only once the first job's process started,
  and would queue it to run again).
- uploads (``PUT /datastore/``, ``PUT /datastore/label``, ``POST /infer/<model>`` with a file or label,
  ``PUT /model/<model>``, ``PUT /session/``): a request that fails deletes the temporary files its
  upload was written to. MONAI Label deletes them with background tasks, which never run for a request
  that raises, so every rejected upload (a bad NIfTI, a label with unknown classes: 422) stayed in the
  server's temporary folder, as large as it was sent.

Endpoints run on worker threads (:mod:`semisam_o1.server.web`), so requests run concurrently: a next-sample
choice and its "served to client X" record are one step (two clients asking at once never get the
same image as a fresh pick), and a job's "already running?" check and its start are one step.
"""

from __future__ import annotations

import contextvars
import json
import shutil
import tempfile
import threading
from typing import Callable

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints import activelearning as activelearning_endpoint
from monailabel.endpoints import batch_infer as batch_endpoint
from monailabel.endpoints import datastore as datastore_endpoint
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints import model as model_endpoint
from monailabel.endpoints import scoring as scoring_endpoint
from monailabel.endpoints import session as session_endpoint
from monailabel.endpoints import train as train_endpoint
from monailabel.utils.async_tasks.utils import tasks
from monailabel.utils.others.generic import remove_file

from semisam_o1.parsers import ConfError
from semisam_o1.safe_names import result_suffix, safe_name
from semisam_o1.server.errors import client_errors, unknown
from semisam_o1.volumes import InputError


def parse_params(text: str | None, field: str = "params") -> dict:
    """The JSON object of a form field (empty: ``{}``).

    Raises:
        InputError: naming ``field``, when the text is not JSON or not an object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{field}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


#: Next sample: choose and record who it was served to, one request at a time.
_SAMPLE_LOCK = threading.Lock()
#: Background jobs: check what runs and submit, one request at a time.
_JOBS_LOCK = threading.Lock()


def _wrap(module, name: str, make):
    """Replace ``module.<name>`` by ``make(original)``; the original stays reachable as ``__wrapped__``."""
    original = getattr(getattr(module, name), "__wrapped__", getattr(module, name))
    wrapper = make(original)
    wrapper.__wrapped__ = original
    setattr(module, name, wrapper)


#: The temporary file names MONAI Label's upload endpoints took in the running request (see :func:`deleting_uploads_on_error`).
_UPLOADS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("uploads", default=None)


class _RecordingTempfile:
    """The ``tempfile`` module, as MONAI Label's upload endpoints see it: each ``NamedTemporaryFile``
    name they take is recorded for the running request."""

    def __getattr__(self, name: str):
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args, **kwargs):
        handle = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (returned open, as tempfile's)
        taken = _UPLOADS.get()
        if taken is not None:
            taken.append(handle.name)
        return handle


def deleting_uploads_on_error(original):
    """``original``, a MONAI Label endpoint function that writes uploads to temporary files; when it raises,
    those files (or folders) are deleted before the error is answered."""

    def run(*args, **kwargs):
        taken: list[str] = []
        token = _UPLOADS.set(taken)
        try:
            return original(*args, **kwargs)
        except BaseException:
            for path in taken:
                remove_file(path)
            raise
        finally:
            _UPLOADS.reset(token)

    return run


#: MONAI Label's endpoint functions that write a request's uploads to temporary files.
UPLOAD_ENDPOINTS = ((datastore_endpoint, "add_image"), (datastore_endpoint, "save_label"), (model_endpoint, "update_model"),
                    (session_endpoint, "create_session"))


def install(app, needs_template: set[str], has_template: Callable[[], bool]) -> None:
    """Wrap MONAI Label's endpoint functions with the checks of this module, for ``app``.

    Args:
        app: the ``MONAILabelApp`` (its task registries ``_infers``, ``_strategies``,
            ``_scoring_methods``, ``_trainers`` and its ``datastore()``).
        needs_template: trainers that cannot start without a template.
        has_template: whether the datastore has one now.
    """

    def check_image(image_id: str) -> None:
        safe_name("image", image_id)
        if not app.datastore().get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")

    def known_model(model: str) -> str:
        """``model`` if the app has it; 404 naming it and the known ones if not."""
        if model not in app._infers:
            raise unknown("model", "models", model, app._infers)
        return model

    def infer(original):
        def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
            model = known_model(model)
            with client_errors():
                request = parse_params(params)
                result_suffix(request)
                for kind, value in (("image", image), ("session_id", session_id)):
                    if value:
                        safe_name(kind, value)
                if "image" in request:  # params override the query (MONAI Label: request.update(params))
                    check_image(request["image"])
                elif not (file or session_id):
                    if not image:
                        raise InputError("image: give the id of a datastore image, upload a file, or give a session_id")
                    check_image(image)
                if output == "dicom_seg" and not isinstance(app.datastore(), DICOMWebDatastore):
                    raise InputError("output=dicom_seg: only with a DICOMweb datastore (--studies http(s)://...)")
            return original(background_tasks, model, image, session_id, params, file, label, output)

        return run_inference

    def batch(original):
        def run(model, images=None, params=None, run_sync=False):
            return original(known_model(model), images, params, run_sync)

        return run

    def activelearning(original):
        def sample(strategy, params=None, user=None):
            if strategy not in app._strategies:
                raise unknown("strategy", "strategies", strategy, app._strategies)
            with _SAMPLE_LOCK:
                return original(strategy, params, user)

        return sample

    def scoring(original):
        def run_method(method, params=None, run_sync=False):
            if method not in app._scoring_methods:
                raise unknown("scoring method", "scoring methods", method, app._scoring_methods)
            with _JOBS_LOCK:
                return original(method, params, run_sync)

        return run_method

    def train(original):
        def run_model(model, params=None, run_sync=False, enqueue=False):
            if model not in app._trainers:
                raise unknown("trainer", "trainers", model, app._trainers)
            options = getattr(app._trainers[model], "options", None)
            if options is not None:
                try:
                    options(params or {})
                except ConfError as e:
                    raise HTTPException(status_code=422, detail=f"training option {e}") from None
            if model in needs_template and not has_template():
                raise HTTPException(
                    status_code=409, detail=f"'{model}' needs a template: save a 'final' label for at least one image first"
                )
            with _JOBS_LOCK:
                active = [t for t in tasks("train") if t.get("status") in ("SUBMITTED", "RUNNING")]
                if active and not enqueue:
                    raise HTTPException(
                        status_code=429,
                        detail=f"training is already {active[0]['status'].lower()} (job {active[0]['id']}): wait for it, or stop it with DELETE /train/",
                    )
                return original(model, params, run_sync, enqueue)

        return run_model

    def model_upload(original):
        def update(background_tasks, model, file):
            """``PUT /model/<model>``: the upload replaces the model's weights only after the task checked them
            (``replace_model``; 422 naming what is wrong, the served model unchanged); a model without weights
            (stage one) -> 422."""
            model = known_model(model)
            replace = getattr(app._infers[model], "replace_model", None)
            if replace is None:
                raise HTTPException(status_code=422, detail=f"model '{model}' has no weights to replace (it is not trained)")
            path = model_endpoint.tempfile.NamedTemporaryFile(suffix=".pt").name  # recorded: deleted if this fails
            try:
                with open(path, "wb") as out:
                    shutil.copyfileobj(file.file, out)
                with client_errors():
                    return replace(path)
            finally:
                remove_file(path)

        return update

    for module in {module for module, _ in UPLOAD_ENDPOINTS} | {infer_endpoint}:
        module.tempfile = _RecordingTempfile()
    for module, name in UPLOAD_ENDPOINTS:
        _wrap(module, name, deleting_uploads_on_error)
    _wrap(infer_endpoint, "run_inference", lambda original: infer(deleting_uploads_on_error(original)))
    _wrap(model_endpoint, "update_model", lambda original: deleting_uploads_on_error(model_upload(original)))
    _wrap(batch_endpoint, "run", batch)
    _wrap(activelearning_endpoint, "sample", activelearning)
    _wrap(scoring_endpoint, "run_method", scoring)
    _wrap(train_endpoint, "run_model", train)
