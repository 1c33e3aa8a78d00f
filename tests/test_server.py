"""`python main.py serve` as a real process: start-up, /info/, and a background job that really runs."""

import time

import pytest
import requests
from conftest import Server

pytestmark = pytest.mark.server


def wait_job(url: str, kind: str, timeout: float = 120.0) -> dict:
    """Poll MONAI Label's job status until it leaves SUBMITTED/RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/{kind}/", params={"all": "false"}, timeout=10).json()
        if status.get("status") not in {"SUBMITTED", "RUNNING"}:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{kind} job still {status.get('status')} after {timeout} s: {status}")


#: No scoring jobs at start-up (they would encode the whole pool with the default encoder).
QUIET = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def test_serve_answers_info_and_runs_a_background_job(datastore):
    with Server(datastore, env=QUIET) as server:
        info = requests.get(f"{server.url}/info/", timeout=10).json()
        assert info["labels"] == {"anterior": 1, "posterior": 2}
        assert {"semisam_stage_one", "semisam_o1"} <= set(info["models"])
        assert "semisam_o1" in info["trainers"]

        submitted = requests.post(f"{server.url}/scoring/dice", timeout=30)
        assert submitted.ok, submitted.text
        status = wait_job(server.url, "scoring")
        assert status["status"] == "DONE", status
    assert "Uvicorn running on http://127.0.0.1" in server.log.read_text()


def test_serve_rejects_unknown_conf_before_starting(datastore):
    import subprocess
    import sys

    from semisam_o1 import PROJECT_ROOT

    result = subprocess.run(
        [sys.executable, "main.py", "serve", "--studies", str(datastore), "--conf", "lables", "a=1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--conf lables: unknown option" in result.stderr


def test_feature_extraction_job_fills_the_cache_with_progress(tiny_studies):
    fast = ["--conf", "stage_one.encoder_image_size", "32", "--conf", "stage_one.encoder_axes", "0", "--conf", "stage_one.feature_dims", "8"]
    with Server(tiny_studies, *fast, env=QUIET) as server:
        assert requests.post(f"{server.url}/scoring/features", timeout=30).ok
        status = wait_job(server.url, "scoring", timeout=600)  # a nice-10 job with two registrations per image: slow on a busy machine
        assert status["status"] == "DONE", status
        assert any("features 3/3" in line for line in status["details"]), status["details"]
    cached = list((tiny_studies / ".semisam" / "features").glob("*/*.npy"))
    assert len(cached) == 3
    # every pool image registered to the template by each method of the default prior (demons and syn)
    assert sorted(p.name.split("-affine-")[1][:-4] for p in (tiny_studies / ".semisam" / "registration").glob("*.npz")) == ["demons"] * 3 + ["syn"] * 3
