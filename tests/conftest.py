"""Shared fixtures: a real sample datastore (MSD Task04 hippocampus) filled the way `main.py sample-data` does."""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import pytest
from child_process import ChildProcess
from semisam_o1.distributed import free_port
from semisam_o1.sample_data import SampleDataError, download_msd, find_local_source, populate


@pytest.fixture()
def thread_switches_in_gc():
    """While the test runs, every garbage collection yields the GIL and collections come every few
    allocations: another thread then runs inside C code that allocates (numpy's header parse, the AST
    builder) far more often than under a real server's load, so races there show within a second."""
    threshold = gc.get_threshold()
    yield_gil = lambda phase, info: time.sleep(0) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(yield_gil)
    gc.set_threshold(5, 10, 10)
    try:
        yield
    finally:
        gc.callbacks.remove(yield_gil)
        gc.set_threshold(*threshold)


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory):
    """The hippocampus data: ../shared/data/hippocampus, else the official MSD download; skip if neither."""
    source = find_local_source()
    if source is not None:
        return source
    try:
        return download_msd(tmp_path_factory.mktemp("msd"))
    except Exception as e:  # no local copy and no network: the only reason to skip
        pytest.skip(f"no sample data: ../shared/data/hippocampus is absent and the MSD download failed ({e})")


def make_datastore(root: Path, source) -> Path:
    """A fresh copy of the sample datastore under ``root`` (a new folder: ``populate`` brings the manifest)."""
    populate(root, source=source, progress=False)
    return root


@pytest.fixture()
def datastore(tmp_path, sample_source) -> Path:
    """A writable sample datastore for one test."""
    return make_datastore(tmp_path / "studies", sample_source)


@pytest.fixture()
def tiny_studies(tmp_path, sample_source) -> Path:
    """Template hippocampus_001 (its final label) + 2 unlabelled images; ground truth kept aside."""
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in ["hippocampus_001", "hippocampus_003", "hippocampus_008"]:
        shutil.copy(sample_source.images / f"{case}.nii.gz", studies)
    shutil.copy(sample_source.labels / "hippocampus_001.nii.gz", studies / "labels" / "final")
    return studies


__all__ = ["SampleDataError", "make_datastore"]


class Server(ChildProcess):
    """`python main.py serve` as a real process on a free loopback port; stopped on exit."""

    stop_timeout = 30.0

    def __init__(self, studies: Path | str, *extra: str, env: dict | None = None, start_timeout: float = 120.0, log_dir: Path | None = None,
                 port: int | None = None):
        import os
        import subprocess
        import sys

        from semisam_o1 import PROJECT_ROOT

        self.port = port or free_port()  # a port chosen before: the OpenID provider registers the server's redirect URI first
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_") and k != "PYTHONPATH"}, **(env or {})}
        env = {k: v for k, v in env.items() if v is not None}  # env={"X": None}: X unset for the server
        self.log = Path(log_dir or Path(studies).parent) / f"server-{self.port}.log"  # studies may be a DICOMweb URL
        cmd = [sys.executable, str(PROJECT_ROOT / "main.py"), "serve", "--studies", str(studies), "--port", str(self.port)]
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen([*cmd, *extra], cwd=PROJECT_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.start_timeout = start_timeout

    def start(self) -> float:
        """(The process starts with the object.) Waits until it answers ``/info/``; returns the seconds it took."""
        import requests

        def answers() -> bool:
            status = requests.get(f"{self.url}/info/", timeout=5).status_code
            return status == 200 or status == 401  # 401: up, with authentication enabled

        return self.wait_ready("server", answers, 0.5)

