"""Background refresh of stage-one pseudo-labels after a clinician saves a ``final`` label.

MONAI Label calls the app's ``on_save_label`` inside the PUT /datastore/label request; the refresh
(registration of the new template to every unlabelled image, then propagation from cached
features) takes seconds per image, so it runs in one background thread, which waits before each
image while an interactive request runs (:mod:`semisam_o1.server.priority`). Saves that arrive while a
refresh runs are coalesced into one more refresh, which sees every template saved until it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from monailabel.interfaces.datastore import Datastore

from semisam_o1.config import AppConfig
from semisam_o1.pool import pool_runner, record_unreadable, refresh_pseudo_labels
from semisam_o1.server.priority import InteractivePriority
from semisam_o1.stage_one.predictor import StageOne

logger = logging.getLogger(__name__)


class PseudoLabelRefresher:
    """``request()`` schedules a refresh; ``status()`` tells what ran last (for /info/ and tests)."""

    def __init__(self, stage_one: StageOne, datastore: Callable[[], Datastore], labels: Callable[[], dict[str, int]],
                 config: AppConfig = AppConfig()):
        self.stage_one = stage_one
        self.config = config
        self._datastore = datastore
        self._labels = labels
        self.priority = InteractivePriority(stage_one.studies)
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.last: dict = {}

    def request(self) -> None:
        with self._lock:
            self._wanted.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="semisam-refresh", daemon=True)
                self._thread.start()

    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None

    def status(self) -> dict:
        return {"running": self.busy(), "runs": self.runs, "last": self.last}

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._wanted.is_set():
                    self._thread = None
                    return
                self._wanted.clear()
            start = time.perf_counter()
            try:
                failed: dict[str, str] = {}
                with pool_runner(self.stage_one.studies, self.config) as runner:  # in process unless --conf ray_address
                    cases = refresh_pseudo_labels(self.stage_one, self._datastore(), self._labels(), errors=failed,
                                                  before_image=self.priority.wait_turn, runner=runner, config=self.config)
                self.last = {"images": len(cases), "seconds": round(time.perf_counter() - start, 1), "error": None, "failed": failed}
                record_unreadable(self.stage_one.studies, "stage_one", failed)
            except Exception as e:  # a background thread has no caller to raise to: log and report
                logger.exception("stage-one refresh failed")
                self.last = {"images": 0, "seconds": round(time.perf_counter() - start, 1), "error": str(e)}
            self.runs += 1
            logger.info(f"stage-one refresh {self.runs}: {self.last}")
