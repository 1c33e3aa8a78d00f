"""Background job processes never outlive the server that started them.

MONAI Label runs train, scoring and batch-infer jobs as ``python -m monailabel.interfaces.utils.app``
subprocesses, queued one per kind on a thread pool (``monailabel.utils.async_tasks.utils``). Left
alone, a job kept running after the server stopped, and a queued one still started at interpreter
exit. Here:

- :func:`stop_background_jobs` (the server's shutdown) cancels queued jobs (status ``STOPPED``) and
  kills running job processes with every process they started;
- :func:`exit_with_parent` (in a job process) ends the job when its server is gone, even after a
  ``kill -9`` of the server, which runs no shutdown: results are written atomically, so a job ended
  this way leaves its old files or none, never half of one.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime

import psutil

logger = logging.getLogger(__name__)

JOB_MODULE = "monailabel.interfaces.utils.app"
#: The server's process id, set in the server's environment (its job processes inherit it).
SERVER_PID = "SEMISAM_SERVER_PID"


def stop_background_jobs() -> int:
    """Cancel every queued MONAI Label job and kill every running one (process tree); returns how many."""
    from monailabel.utils.async_tasks import utils as tasks

    stopped = 0
    for executor in list(tasks.background_executors.values()):
        executor.shutdown(wait=False, cancel_futures=True)
    for method, queue in list(tasks.background_tasks.items()):
        for task in queue:
            if task.get("status") == "SUBMITTED":
                task.update(status="STOPPED", end_ts=datetime.today().strftime("%Y-%m-%d %H:%M:%S"))
                stopped += 1
    for method, running in list(tasks.background_processes.items()):
        for task_id, process in list(running.items()):
            try:
                tree = psutil.Process(process.pid)
                for p in [*tree.children(recursive=True), tree]:
                    p.kill()
            except psutil.NoSuchProcess:
                continue
            stopped += 1
            logger.info(f"server shutdown: killed {method} job {task_id} (pid {process.pid})")
    return stopped


def in_job_process() -> bool:
    """True in a MONAI Label background job process (not in the server)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == JOB_MODULE


def exit_with_parent(poll_seconds: float = 1.0) -> threading.Thread:
    """Watch the server from a daemon thread; exit this process (status 143) once it is no longer this
    process's parent (the server is :data:`SERVER_PID` in the environment, else the parent at start),
    also when it died while this job was still starting."""
    server = int(os.environ.get(SERVER_PID) or os.getppid())

    def check():
        if os.getppid() != server:
            logger.warning(f"the server (pid {server}) is gone: this background job ends")
            os._exit(143)

    def watch():
        while True:
            check()
            time.sleep(poll_seconds)

    thread = threading.Thread(target=watch, name="semisam-exit-with-server", daemon=True)
    thread.start()
    return thread
