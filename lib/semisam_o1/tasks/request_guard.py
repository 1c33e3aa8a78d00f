"""Checks that run before MONAI Label's endpoints do anything with a request.

MONAI Label 0.8.5's route handlers call module-level functions of ``monailabel.endpoints.*`` that
are looked up at call time, so :func:`install` wraps those functions once (installing again
re-wraps the originals).

``POST /infer/<model>``: the ``image`` query parameter, an ``image`` key in the ``params`` form field
and ``session_id`` must be safe names (:func:`~semisam_o1.safe_names.safe_name`), else 422 naming
the parameter: MONAI Label would otherwise read any existing server path given as ``image`` (and
a session id is joined into the sessions folder). ``params`` must be a JSON object and its
``result_extension`` a plain extension (422), checked before any computation.
"""

from __future__ import annotations

import json

from monailabel.endpoints import infer as infer_endpoint

from semisam_o1.safe_names import safe_name
from semisam_o1.tasks.errors import client_errors
from semisam_o1.tasks.label_infer import LabelInfer
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


def _wrap(module, name: str, make):
    """Replace ``module.<name>`` by ``make(original)``; the original stays reachable as ``__wrapped__``."""
    original = getattr(getattr(module, name), "__wrapped__", getattr(module, name))
    wrapper = make(original)
    wrapper.__wrapped__ = original
    setattr(module, name, wrapper)


def install() -> None:
    """Wrap MONAI Label's endpoint functions with the checks of this module."""

    def infer(original):
        def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
            with client_errors():
                request = parse_params(params)
                for kind, value in (("image", image), ("params image", request.get("image")), ("session_id", session_id)):
                    if value:
                        safe_name(kind, value)
                LabelInfer.result_suffix(request)
            return original(background_tasks, model, image, session_id, params, file, label, output)

        return run_inference

    _wrap(infer_endpoint, "run_inference", infer)
