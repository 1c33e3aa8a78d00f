"""``kill -9`` of the server (and its training job process) during a stage-two round, then a restart:
the round resumes, finished rounds and the clinician's labels are untouched, nothing half-written is read."""

from __future__ import annotations

import json
import time

import psutil
import pytest
import requests
from conftest import Server
from test_server import QUIET, wait_job

pytestmark = pytest.mark.server

CONF = {"labels": "anterior=1,posterior=2", "stage_one.encoder_image_size": "32", "stage_one.encoder_axes": "0", "stage_one.feature_dims": "8", "stage_one.registration": "demons",
        "iterations": "60", "train.patch": "16", "rounds": "2"}
ARGS = [a for key, value in CONF.items() for a in ("--conf", key, value)]


def kill_9_tree(process) -> None:
    """SIGKILL the server and every process it started (a power cut, an OOM kill of the whole service)."""
    tree = psutil.Process(process.pid)
    for p in [tree, *tree.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def test_kill_9_during_a_training_round_then_restart_resumes_the_round(tiny_studies):
    work = tiny_studies / ".semisam" / "stage2"
    final = {p: p.read_bytes() for p in (tiny_studies / "labels" / "final").iterdir()}
    server = Server(tiny_studies, *ARGS, env={**QUIET, "OMP_NUM_THREADS": "1"}).__enter__()
    try:
        assert requests.post(f"{server.url}/train/semisam_o1", json={}, timeout=30).ok
        deadline = time.monotonic() + 300
        while True:  # round 1 committed, round 2 training
            job = requests.get(f"{server.url}/train/", timeout=30).json()
            assert job["status"] in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline, job
            if any("round 2/2 train iteration" in line for line in job.get("details") or []):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        kill_9_tree(server.process)
        server.stop()

        state = json.loads((work / "state.json").read_text())
        assert [r["round"] for r in state["rounds"]] == [1]  # round 2 was not committed
        before = state["rounds"]
        round1 = {p: p.read_bytes() for p in (work / "round_1").rglob("*") if p.is_file()}
        # what a kill in the middle of a write leaves (atomic_write's hidden temporary file), made sure of here
        half = work / "round_2" / "labels" / ".hippocampus_003.nii.gz.killed.nii.gz"
        half.parent.mkdir(parents=True, exist_ok=True)
        half.write_bytes((work / "round_1" / "labels" / "hippocampus_003.nii.gz").read_bytes()[:100])
        published = (work / "model.pt").read_bytes()

        server = Server(tiny_studies, *ARGS, env={**QUIET, "OMP_NUM_THREADS": "1"}).__enter__()
        assert requests.post(f"{server.url}/infer/semisam_o1", params={"image": "hippocampus_003", "output": "json"}, timeout=120).ok  # round 1's network serves
        assert requests.post(f"{server.url}/train/semisam_o1", json={}, timeout=30).ok
        job = wait_job(server.url, "train", timeout=300)
        assert job["status"] == "DONE", job
        log = server.log.read_text()
        assert "round 1/2 train" not in log and "round 2/2 train" in log  # resumed at round 2

        state = json.loads((work / "state.json").read_text())
        assert [r["round"] for r in state["rounds"]] == [1, 2]
        assert state["rounds"][0] == before[0]  # round 1 as it was committed before the kill, not run again
        assert {p: p.read_bytes() for p in (work / "round_1").rglob("*") if p.is_file()} == round1  # kept as they were
        chosen = state["published"]["round"]  # by the label-free signal, over both committed rounds
        assert (work / "model.pt").read_bytes() == (work / f"round_{chosen}" / "model.pt").read_bytes()
        assert chosen == 2 or (work / "model.pt").read_bytes() == published
        assert not [p for p in work.rglob(".*") if p.is_file()]  # no leftover temporary file of the killed round
        assert requests.post(f"{server.url}/infer/semisam_o1", params={"image": "hippocampus_008", "output": "json"}, timeout=120).ok
    finally:
        server.stop()
    assert {p: p.read_bytes() for p in (tiny_studies / "labels" / "final").iterdir()} == final  # the clinician's labels
