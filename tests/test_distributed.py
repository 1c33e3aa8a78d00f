"""Pool-wide stage one on a real two-node Ray cluster on this machine (``ray start --head`` plus a second
``ray start --address``, 1 CPU each), driven by the real CLI (``main.py pipeline --ray-address``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from semisam_o1.active_learning import SCORE_KEY
from semisam_o1.cli import main
from semisam_o1.config import AppConfig
from semisam_o1.distributed import free_port
from semisam_o1.pipeline import run_stage_one
from semisam_o1.pool import open_datastore

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
#: a test cluster without token authentication (the driver subprocesses get the same environment)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
FAST = {"labels": "anterior=1,posterior=2", "stage_one.encoder_image_size": "32", "stage_one.registration": "demons", "stage_one.encoder_axes": "0", "stage_one.feature_dims": "8"}
CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_008", "hippocampus_017"]


def make_studies(root: Path, source) -> Path:
    """Template hippocampus_001 + 3 unlabelled images."""
    (root / "labels" / "final").mkdir(parents=True)
    for case in CASES:
        shutil.copy(source.images / f"{case}.nii.gz", root)
    shutil.copy(source.labels / "hippocampus_001.nii.gz", root / "labels" / "final")
    return root


def ray_cli(*args: str, check: bool = True, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(RAY), *args], env=ENV, capture_output=True, text=True, timeout=180, check=check)


def node_args() -> list[str]:
    return ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def cluster():
    """GCS address of a two-node Ray cluster (head + one more node, 1 CPU each), stopped afterwards."""
    ray_cli("stop", "--force", check=False)
    address = f"127.0.0.1:{free_port()}"
    ray_cli("start", "--head", "--port", address.split(":")[1], "--include-dashboard=false", *node_args())
    ray_cli("start", "--address", address, *node_args())
    yield address
    ray_cli("stop", "--force", check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_source) -> Path:
    """The same pool pseudo-labelled in this process (no Ray)."""
    studies = make_studies(tmp_path_factory.mktemp("in_process") / "studies", sample_source)
    report = run_stage_one(studies, AppConfig.from_conf(FAST), progress=False)
    assert report["images"] == 3 and not report["errors"]
    return studies


def pipeline_command(studies: Path, address: str) -> list[str]:
    conf = [x for k, v in FAST.items() for x in ("--conf", k, v)]
    return [sys.executable, str(ROOT / "main.py"), "pipeline", "--studies", str(studies), "--stage", "1", "--ray-address", address, *conf]


def same_npz(a: Path, b: Path, atol: float) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(
            np.allclose(x[k], y[k], atol=atol) if x[k].dtype.kind in "fc" else np.array_equal(x[k], y[k]) for k in x.files)


def assert_same_outputs(studies: Path, reference: Path) -> None:
    """Labels identical; features within float16 rounding; registrations equal; no temporary file left."""
    pseudo = sorted(p.name for p in (reference / "labels" / "pseudo").glob("*.nii.gz"))
    assert pseudo and sorted(p.name for p in (studies / "labels" / "pseudo").glob("*.nii.gz")) == pseudo
    import nibabel as nib

    for name in pseudo:
        ours, theirs = (np.asarray(nib.load(str(s / "labels" / "pseudo" / name)).dataobj) for s in (studies, reference))
        assert np.array_equal(ours, theirs), name
    features = sorted((reference / ".semisam" / "features").rglob("*.np[yz]"))
    assert len(features) == len(CASES) + 1  # every image and the basis
    for path in features:
        other = studies / path.relative_to(reference)
        if path.suffix == ".npy":
            np.testing.assert_allclose(np.load(other).astype(np.float32), np.load(path).astype(np.float32), atol=1e-3)
        else:
            assert same_npz(path, other, atol=1e-5)
    registrations = sorted(p.name for p in (reference / ".semisam" / "registration").glob("*.npz"))
    assert registrations == sorted(p.name for p in (studies / ".semisam" / "registration").glob("*.npz"))
    for name in registrations:
        assert same_npz(reference / ".semisam" / "registration" / name, studies / ".semisam" / "registration" / name, atol=1e-4), name
    hidden = {p.relative_to(reference) for p in reference.rglob(".*") if p.is_file()}  # a clean run's (the datastore's .lock)
    leftovers = [p for p in studies.rglob(".*") if p.is_file() and p.relative_to(studies) not in hidden]
    assert not leftovers  # atomic_write's temporaries, the cluster check's marker


def test_two_node_cluster_pseudo_labels_equal_the_in_process_run(cluster, reference, tmp_path, sample_source):
    studies = make_studies(tmp_path / "studies", sample_source)
    run = subprocess.run(pipeline_command(studies, cluster), env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stage 1: 3 pseudo-labels" in run.stdout
    assert_same_outputs(studies, reference)


def test_a_worker_killed_while_its_task_runs_leaves_the_same_outputs(cluster, reference, tmp_path, sample_source):
    studies = make_studies(tmp_path / "studies", sample_source)
    job = subprocess.Popen(pipeline_command(studies, cluster), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and job.poll() is None and time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        busy = [int(line.split()[0]) for line in ps if line.split(None, 1)[-1].startswith(("ray::pseudo_label_image", "ray::prepare_image"))]
        if busy:
            time.sleep(0.5)  # well inside the task (each takes seconds)
            try:
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    out, err = job.communicate(timeout=600)
    assert killed is not None, "no task was seen running"
    assert job.returncode == 0, err[-3000:]
    assert "stage 1: 3 pseudo-labels" in out
    assert_same_outputs(studies, reference)


def test_server_jobs_run_on_the_cluster(cluster, reference, tmp_path, sample_source):
    """The features job, the stage-one model's batch infer and uncertainty scoring of a server started
    with ``--ray-address``: their work runs as Ray tasks and the labels equal the in-process run's."""
    from conftest import Server
    from test_server import QUIET, wait_job

    studies = make_studies(tmp_path / "studies", sample_source)
    conf = [x for k, v in FAST.items() for x in ("--conf", k, v)]
    with Server(studies, "--ray-address", cluster, *conf, env={**ENV, **QUIET}, log_dir=tmp_path) as server:
        assert requests.post(f"{server.url}/scoring/features", timeout=30).ok
        status = wait_job(server.url, "scoring", timeout=600)
        assert status["status"] == "DONE", status
        assert any(f"features: 4 items as Ray tasks ({cluster})" in line for line in status["details"]), status["details"][-20:]
        assert requests.post(f"{server.url}/batch/infer/semisam_stage_one", timeout=30).ok
        status = wait_job(server.url, "batch/infer", timeout=600)
        assert status["status"] == "DONE", status
        assert any(f"stage 1: propagate: 3 items as Ray tasks ({cluster})" in line for line in status["details"]), status["details"][-20:]
        assert requests.post(f"{server.url}/scoring/uncertainty", timeout=30).ok
        status = wait_job(server.url, "scoring", timeout=600)
        assert status["status"] == "DONE", status
        assert any(f"3 items as Ray tasks ({cluster})" in line for line in status["details"]), status["details"][-20:]
    infos = [open_datastore(studies).get_image_info(i) for i in CASES[1:]]
    assert all(0 <= info[SCORE_KEY]["score"] and info[SCORE_KEY]["source"] == "stage1" for info in infos), infos
    import nibabel as nib

    for case in CASES[1:]:
        ours, theirs = (np.asarray(nib.load(str(s / "labels" / "pseudo" / f"{case}.nii.gz")).dataobj) for s in (studies, reference))
        assert np.array_equal(ours, theirs), case


def test_unreachable_ray_address_is_a_start_up_error_naming_it(tmp_path, sample_source, capsys):
    studies = make_studies(tmp_path / "studies", sample_source)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    assert main(["pipeline", "--studies", str(studies), "--stage", "1", "--ray-address", address]) == 2
    assert main(["serve", "--studies", str(studies), "--ray-address", address]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.count(f"ray_address '{address}'") == 2 and "no Ray cluster reachable" in err
    assert not (studies / "labels" / "pseudo").exists()


def test_a_worker_that_cannot_see_the_datastore_is_named(cluster, tmp_path, sample_source):
    """A third node whose file system hides the datastore (a private mount namespace with an empty
    tmpfs over it): the job refuses to start, naming that worker and the path. Runs last: the node stays."""
    studies = make_studies(tmp_path / "hidden" / "studies", sample_source)
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "-m", "true"]).returncode != 0:
        pytest.skip("needs root and unshare -m to give one Ray node its own view of the file system")
    mount = f"mount -t tmpfs none {tmp_path / 'hidden'} && exec {RAY} start --address {cluster} {' '.join(node_args())}"
    subprocess.run([unshare, "-m", "sh", "-c", mount], env=ENV, capture_output=True, text=True, timeout=180, check=True)
    run = subprocess.run(pipeline_command(studies, cluster), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "cannot use the datastore" in run.stderr and str(studies.resolve()) in run.stderr and "does not exist there" in run.stderr
    assert not (studies / "labels" / "pseudo").exists()
    assert not [p for p in studies.glob(".ray-check-*")]
