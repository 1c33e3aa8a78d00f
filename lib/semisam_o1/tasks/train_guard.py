"""Refuse ``POST /train/<model>`` before a job is queued: 409 without a template, 429 while one runs.

MONAI Label 0.8.5 queues every train request as a background job and answers 200 at once, so a
training that cannot start would only fail later inside the job. It refuses a second request only
once the first job's process has started: a request in between is queued and runs again after the
first. Its endpoint function ``monailabel.endpoints.train.run_model`` is looked up at call time, so
wrapping it is enough.
"""

from __future__ import annotations

from typing import Callable

from fastapi import HTTPException
from monailabel.endpoints import train as train_endpoint
from monailabel.utils.async_tasks.utils import tasks


def install(needs_template: set[str], has_template: Callable[[], bool]) -> None:
    """Wrap the train endpoint once: models in ``needs_template`` need ``has_template()``."""
    original = getattr(train_endpoint.run_model, "__wrapped__", train_endpoint.run_model)

    def run_model(model: str, params=None, run_sync=False, enqueue=False):
        if model in needs_template and not has_template():
            raise HTTPException(
                status_code=409, detail=f"'{model}' needs a template: save a 'final' label for at least one image first"
            )
        active = [t for t in tasks("train") if t.get("status") in ("SUBMITTED", "RUNNING")]
        if active and not enqueue:
            raise HTTPException(
                status_code=429,
                detail=f"training is already {active[0]['status'].lower()} (job {active[0]['id']}): wait for it, or stop it with DELETE /train/",
            )
        return original(model, params, run_sync, enqueue)

    run_model.__wrapped__ = original
    train_endpoint.run_model = run_model
