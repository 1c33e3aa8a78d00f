"""Turn the library's input errors into HTTP 4xx answers, whatever MONAI Label endpoint runs the task.

MONAI Label 0.8.5 maps any exception from a task to HTTP 500; FastAPI's ``HTTPException`` raised
inside the task passes through its endpoints unchanged, so tasks raise that for a client's mistake.
"""

from __future__ import annotations

from contextlib import contextmanager

from fastapi import HTTPException

from semisam_o1.safe_names import public
from semisam_o1.stage_one.encoders import EncoderError
from semisam_o1.stage_one.predictor import NoTemplateError
from semisam_o1.volumes import InputError, TooLargeError


def unknown(kind: str, plural: str, name: str, known) -> HTTPException:
    """404 for a task name the app does not have, e.g. ``unknown model 'x'; known models: a, b``."""
    return HTTPException(status_code=404, detail=f"unknown {kind} '{name}'; known {plural}: {', '.join(sorted(known)) or 'none'}")


@contextmanager
def client_errors():
    """``NoTemplateError`` -> 409 (the datastore is not ready), ``TooLargeError`` -> 413, other ``InputError`` -> 422;
    messages without server paths (:func:`public`)."""
    try:
        yield
    except NoTemplateError as e:
        raise HTTPException(status_code=409, detail=public(str(e))) from e
    except TooLargeError as e:
        raise HTTPException(status_code=413, detail=public(str(e))) from e
    except (InputError, EncoderError) as e:
        raise HTTPException(status_code=422, detail=public(str(e))) from e
