"""Interactive requests before background work, across the server and its job processes.

A clinician's infer request and the background pool jobs (the ``features`` and ``uncertainty``
scoring jobs, MONAI Label subprocesses started with the server) share the same cores. The server
holds a *shared* ``flock`` on ``<studies>/.semisam/interactive.lock`` while it serves an
interactive request (:meth:`InteractivePriority.interactive`; several requests at once share it).
A background job calls :meth:`InteractivePriority.wait_turn` before each image: it takes the lock
*exclusively* for an instant, so it waits while any interactive request runs, then goes on. An
interactive request therefore waits at most for the image a job is encoding when it arrives, and
that image runs at the job's lowered CPU priority (:func:`lower_job_priority`).

The lock is the kernel's: a server killed in the middle of a request (``kill -9``) releases it, so a
job never waits for a request that no longer exists.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = Path(".semisam") / "interactive.lock"
#: ``nice`` increment of a background job process (0 = normal, 19 = lowest).
JOB_NICENESS = 10


class InteractivePriority:
    """The interactive lock of the datastore ``studies`` (its cache folder ``studies/.semisam``)."""

    def __init__(self, studies: Path | str):
        self.path = Path(studies) / LOCK_NAME

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextmanager
    def interactive(self):
        """Held while an interactive request runs: background jobs pause before their next image.

        Nothing in a background job process (its infer calls, e.g. batch infer, are background work)."""
        if in_job_process():
            yield
            return
        fd = self._open()  # one open file per request: flock is per open file, threads share nothing
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def busy(self) -> bool:
        """Whether an interactive request runs now (in any process)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def wait_turn(self) -> float:
        """Block while an interactive request runs; the seconds waited (0.0 when none ran)."""
        if not self.busy():
            return 0.0
        start = time.perf_counter()
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)
        return time.perf_counter() - start


def in_job_process() -> bool:
    """Whether this process is a MONAI Label background job (``python -m monailabel.interfaces.utils.app``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monailabel.interfaces.utils.app"


def lower_job_priority() -> None:
    """Lower the CPU priority of this process when it is a background job process (never the server's)."""
    if in_job_process() and os.getpriority(os.PRIO_PROCESS, 0) < JOB_NICENESS:
        os.nice(JOB_NICENESS - os.getpriority(os.PRIO_PROCESS, 0))
        logger.info(f"background job: CPU priority lowered (nice {os.getpriority(os.PRIO_PROCESS, 0)})")
