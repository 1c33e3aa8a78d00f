"""Background jobs end with the server: a stopped server leaves no job process and starts no queued
job; a job whose server was killed (``kill -9``, no shutdown) ends on its own."""

from __future__ import annotations

import shutil
import time

import psutil
import pytest
from conftest import Server
from semisam_o1.server.jobs import JOB_MODULE

pytestmark = pytest.mark.server

FAST = ["--conf", "stage_one.encoder_image_size", "32", "--conf", "stage_one.encoder_axes", "0", "--conf", "stage_one.feature_dims", "8", "--conf", "stage_one.registration", "demons"]


def big_pool(datastore, sample_source):
    """The sample datastore with all 60 images: the start-up features job runs for a while."""
    for image in sorted(sample_source.images.glob("*.nii.gz")):
        if not (datastore / image.name).exists():
            shutil.copy(image, datastore)
    return datastore


def job_processes(server: Server, timeout: float = 120) -> list[psutil.Process]:
    """The server's running job processes, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [p for p in psutil.Process(server.process.pid).children(recursive=True) if JOB_MODULE in " ".join(p.cmdline())]
        if jobs:
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"no background job started in {timeout} s:\n{server.log.read_text()[-3000:]}")


def gone(processes: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


def test_stopping_the_server_stops_its_jobs(datastore, sample_source, tmp_path):
    server = Server(big_pool(datastore, sample_source), *FAST, env={"OMP_NUM_THREADS": "1"}, log_dir=tmp_path).__enter__()
    try:
        jobs = job_processes(server)
    finally:
        server.stop()  # SIGTERM: uvicorn's shutdown
    assert server.process.returncode is not None
    assert gone(jobs, 30), f"job processes {[p.pid for p in jobs]} outlived the server"
    time.sleep(3)  # nothing queued starts after the shutdown either
    assert not [p for p in psutil.process_iter(["cmdline", "environ"]) if JOB_MODULE in " ".join(p.info["cmdline"] or [])
                and (p.info["environ"] or {}).get("MONAI_LABEL_STUDIES") == str(datastore.resolve())]


def test_a_job_ends_when_its_server_is_killed(datastore, sample_source, tmp_path):
    server = Server(big_pool(datastore, sample_source), *FAST, env={"OMP_NUM_THREADS": "1"}, log_dir=tmp_path).__enter__()
    try:
        jobs = job_processes(server)
        server.process.kill()  # kill -9 of the server alone: no shutdown runs
        server.process.wait()
        assert gone(jobs, 30), f"job processes {[p.pid for p in jobs]} outlived the killed server"
    finally:
        server.stop()
