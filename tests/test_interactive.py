"""Interactive requests first, with the server as a real process: requests are served concurrently
(MONAI Label's blocking endpoints run on worker threads), and a clinician's first infer does not
wait behind the start-up ``features`` job encoding the pool."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests
from conftest import Server
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one
from semisam_o1.server.priority import InteractivePriority
from semisam_o1.stage_one.plan import PLAN_FILE
from test_server import QUIET, wait_job

pytestmark = pytest.mark.server

FAST = {"stage_one.encoder_image_size": "32", "stage_one.encoder_axes": "0", "stage_one.feature_dims": "8", "stage_one.registration": "demons"}
FAST_ARGS = [a for key, value in FAST.items() for a in ("--conf", key, value)]
#: One torch thread per process (as benchmarks/load.py): on 2 shared cores, default threads make every
#: timing several times slower and noisier.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


def infer(url: str, image: str, timeout: float = 600) -> requests.Response:
    return requests.post(f"{url}/infer/semisam_stage_one", params={"image": image}, timeout=timeout)


def test_a_listing_is_answered_while_an_infer_runs(tiny_studies):
    """MONAI Label 0.8.5 ran its blocking endpoints on the event loop: the listing waited for the infer."""
    with Server(tiny_studies, *FAST_ARGS, env={**QUIET, "OMP_NUM_THREADS": "1"}) as server:
        done = threading.Event()
        answer = {}

        def first_infer():  # cold: encodes both images and registers them (seconds)
            answer["infer"] = infer(server.url, "hippocampus_003")
            done.set()

        thread = threading.Thread(target=first_infer)
        thread.start()
        time.sleep(0.5)
        listed = []
        while not done.is_set():
            start = time.perf_counter()
            r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=600)
            assert r.status_code == 200
            listed.append((time.perf_counter() - start, done.is_set()))
            time.sleep(0.2)
        thread.join()
        assert answer["infer"].status_code == 200, answer["infer"].text
        assert listed and not listed[0][1], "the first listing waited for the infer to finish"
        assert sum(1 for _, after in listed if not after) >= 2, listed  # answered again and again meanwhile


def wait_features_running(url: str, encoded: int, timeout: float = 300) -> dict:
    """The start-up ``features`` job's status once it has logged ``encoded`` images."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/scoring/", params={"all": "true"}, timeout=30).json()
        for job in [job for job in status if job.get("request", {}).get("method") == "features"]:
            lines = [line for line in job.get("details") or [] if f"features " in line and "/" in line]
            if job.get("status") == "RUNNING" and len(lines) >= encoded:
                return job
        time.sleep(0.3)
    raise AssertionError(f"the features job did not start encoding in {timeout} s: {status}")


def features_status(url: str) -> str:
    status = requests.get(f"{url}/scoring/", params={"all": "true"}, timeout=30).json()
    return [job for job in status if job.get("request", {}).get("method") == "features"][0]["status"]


def test_first_infer_is_served_before_the_pool_job(datastore, sample_source, tmp_path):
    # a pool of 60 images: the start-up features job encodes and registers them for minutes
    for image in sorted(sample_source.images.glob("*.nii.gz")):
        if not (datastore / image.name).exists():
            shutil.copy(image, datastore)
    config = AppConfig.from_conf(FAST)
    build_stage_one(datastore, config)  # writes the datastore's plan (the server reads it)
    templates = sorted((datastore / "labels" / "final").glob("*.nii.gz"))
    assert len(templates) == 1
    template_id = templates[0].name.removesuffix(".nii.gz")
    target = sorted(p.name.removesuffix(".nii.gz") for p in datastore.glob("*.nii.gz"))[-1]  # encoded last by the job

    # reference: this request alone on a fresh server (encoder built, the image and the template
    # encoded, the template registered to the image, labels propagated), on a copy with the same plan
    ref = tmp_path / "reference"
    (ref / "labels" / "final").mkdir(parents=True)
    (ref / ".semisam").mkdir()
    shutil.copy(datastore / PLAN_FILE, ref / PLAN_FILE)
    for name in (template_id, target):
        shutil.copy(datastore / f"{name}.nii.gz", ref)
    shutil.copy(templates[0], ref / "labels" / "final")
    with Server(ref, *FAST_ARGS, env={**QUIET, **SERVER_ENV}, log_dir=tmp_path) as server:
        start = time.perf_counter()
        r = infer(server.url, target)
        alone = time.perf_counter() - start
        assert r.status_code == 200, r.text

    with Server(datastore, *FAST_ARGS, env=SERVER_ENV, log_dir=tmp_path) as server:  # start-up scoring on
        job = wait_features_running(server.url, encoded=2)
        start = time.perf_counter()
        r = infer(server.url, target)
        first = time.perf_counter() - start
        assert r.status_code == 200, r.text
        still_running = features_status(server.url) == "RUNNING"
    print(f"first infer {first:.1f} s while the features job ran; the same request alone {alone:.1f} s; job details: {list(job['details'])[-2:]}")
    assert still_running, "the features job ended before the infer: the pool is too small to compete"
    assert first <= 2 * alone, f"first infer {first:.1f} s > 2 x {alone:.1f} s (the request alone)"


def job_lines(job: dict) -> list[str]:
    return [line for line in job.get("details") or [] if "feature_extraction" in line]


def test_the_pool_job_waits_while_an_interactive_request_runs(tiny_studies):
    with Server(tiny_studies, *FAST_ARGS, env={**QUIET, **SERVER_ENV}) as server:
        assert requests.post(f"{server.url}/scoring/features", timeout=30).ok  # fills the caches
        assert wait_job(server.url, "scoring", timeout=300)["status"] == "DONE"

        with InteractivePriority(tiny_studies).interactive():  # what the server holds during an infer
            assert requests.post(f"{server.url}/scoring/features", timeout=30).ok
            deadline = time.monotonic() + 120
            # the job process has built the app (its last start-up line: MONAI Label's upload sessions)
            while True:
                job = requests.get(f"{server.url}/scoring/", timeout=30).json()
                if any("Session Expiry" in line for line in job.get("details") or []):
                    break
                assert time.monotonic() < deadline and job["status"] in ("SUBMITTED", "RUNNING"), job
                time.sleep(0.2)
            time.sleep(10)  # all cached: without the pause the job finishes within a second
            job = requests.get(f"{server.url}/scoring/", timeout=30).json()
            assert job["status"] == "RUNNING" and not any("features 1/3" in line for line in job_lines(job)), job
        job = wait_job(server.url, "scoring", timeout=120)
        assert job["status"] == "DONE" and any("features 3/3" in line for line in job_lines(job)), job


def test_two_processes_never_encode_one_image_at_once(tiny_studies):
    """Per-image lock around a cache miss: the second cache (e.g. the server while the job encodes) waits and reads."""
    from semisam_o1.volumes import load_image

    config = AppConfig.from_conf(FAST)
    caches = [build_stage_one(tiny_studies, config).cache for _ in range(2)]  # two processes' caches
    caches[0].get_or_compute(load_image(tiny_studies / "hippocampus_001.nii.gz"))  # basis fitted, encoder built
    caches[1].encoder
    encoded = []
    for cache in caches:
        def counting(image, progress=False, device=None, encode=cache.compute):
            encoded.append(image.path.name)
            return encode(image, progress, device)

        cache.compute = counting
    image = load_image(tiny_studies / "hippocampus_003.nii.gz")
    threads = [threading.Thread(target=c.get_or_compute, args=(image,)) for c in caches]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert encoded == ["hippocampus_003.nii.gz"]
    assert all(c.get(image) is not None for c in caches)
