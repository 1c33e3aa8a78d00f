"""Crash and race safety of label saves, with the server as a real process: ``kill -9`` during saves,
restart, and concurrent saves of one image's label."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import Server
from semisam_o1.volumes import load_image, load_label, save_label
from test_server import QUIET

pytestmark = pytest.mark.server

IMAGE = "hippocampus_003"


def variants(studies: Path, sample_source, tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Two different valid labels of IMAGE ('a': the ground truth, 'b': its classes swapped), as files."""
    image = load_image(studies / f"{IMAGE}.nii.gz")
    truth = load_label(sample_source.labels / f"{IMAGE}.nii.gz", image)
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    return {name: (save_label(array, image, tmp_path / f"{name}.nii.gz"), array) for name, array in (("a", truth), ("b", swapped))}


def put_label(url: str, path: Path, who: str, timeout: float = 60) -> requests.Response:
    with open(path, "rb") as f:
        return requests.put(
            f"{url}/datastore/label", params={"image": IMAGE, "tag": "final"}, files={"label": (path.name, f)},
            data={"params": json.dumps({"client": who})}, timeout=timeout,
        )


def stored(studies: Path) -> Path:
    return studies / "labels" / "final" / f"{IMAGE}.nii.gz"


def test_kill_9_during_label_saves_leaves_the_old_or_the_new_label(tiny_studies, sample_source, tmp_path):
    labels = variants(tiny_studies, sample_source, tmp_path)
    server = Server(tiny_studies, env=QUIET).__enter__()
    try:
        exact = {}  # the bytes the server stores for each variant (its NIfTI writer is deterministic)
        for name, (path, _) in labels.items():
            assert put_label(server.url, path, name).status_code == 200
            exact[name] = stored(tiny_studies).read_bytes()
        assert exact["a"] != exact["b"]

        for delay in (0.3, 0.9):  # kill while a client saves a, b, a, ... as fast as the server answers
            acknowledged, in_flight, stop = [], [], threading.Event()

            def save_loop():
                i = 0
                while not stop.is_set():
                    name = "ab"[i % 2]
                    in_flight[:] = [name]
                    try:
                        if put_label(server.url, labels[name][0], name, timeout=30).status_code == 200:
                            acknowledged.append(name)
                    except requests.RequestException:
                        return  # the server died mid-request
                    i += 1

            saver = threading.Thread(target=save_loop)
            saver.start()
            deadline = time.monotonic() + 120  # a busy machine (CI) can take seconds for the first save after a restart
            while not acknowledged and saver.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay)  # then kill somewhere in the stream of saves
            server.process.kill()  # SIGKILL: no cleanup of any kind
            server.process.wait()
            stop.set()
            saver.join(timeout=60)
            server.stop()
            assert acknowledged, "no save finished before the kill"

            # the file is whole: byte-identical to the last save the client was told succeeded, or the one in flight
            after = stored(tiny_studies).read_bytes()
            assert after in (exact[acknowledged[-1]], exact[in_flight[0]])
            server = Server(tiny_studies, env=QUIET).__enter__()  # restarts: the datastore JSON is whole too
            served = requests.get(f"{server.url}/datastore/label", params={"label": IMAGE, "tag": "final"}, timeout=30)
            assert served.status_code == 200 and served.content == after
            assert not list(tiny_studies.rglob("*.partial"))  # an interrupted save's temporary file is gone
    finally:
        server.stop()


def test_concurrent_saves_of_one_label_have_one_winner(tiny_studies, sample_source, tmp_path):
    labels = variants(tiny_studies, sample_source, tmp_path)
    image = load_image(tiny_studies / f"{IMAGE}.nii.gz")
    with Server(tiny_studies, env=QUIET) as server:
        for _ in range(4):
            answers, start = {}, threading.Barrier(2)

            def save(name):
                start.wait()
                answers[name] = put_label(server.url, labels[name][0], name).status_code

            threads = [threading.Thread(target=save, args=(name,)) for name in labels]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert answers == {"a": 200, "b": 200}

            # one winner: the stored file is one client's label, whole, and the datastore's record names that client
            array = load_label(stored(tiny_studies), image)
            winner = [name for name, (_, sent) in labels.items() if np.array_equal(array, sent)]
            assert len(winner) == 1
            info = requests.get(f"{server.url}/datastore/label/info", params={"label": IMAGE, "tag": "final"}, timeout=30).json()
            assert info.get("client") == winner[0], info


KILLED_HALFWAY = """
import os, sys
from semisam_o1.server.atomic_datastore import replace_atomically
dest, new = sys.argv[1], open(sys.argv[2], "rb").read()

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(new[: len(new) // 2])
        f.flush()
    os.kill(os.getpid(), 9)  # the process dies with half of the new label written

replace_atomically(dest, write)
"""


def test_a_label_write_killed_halfway_leaves_the_previous_file(tiny_studies, sample_source, tmp_path):
    import subprocess
    import sys

    from semisam_o1 import PROJECT_ROOT
    from semisam_o1.server.atomic_datastore import AtomicLocalDatastore

    labels = variants(tiny_studies, sample_source, tmp_path)
    dest = stored(tiny_studies)
    dest.write_bytes(labels["a"][0].read_bytes())
    child = subprocess.run([sys.executable, "-c", KILLED_HALFWAY, str(dest), str(labels["b"][0])], env={"PYTHONPATH": str(PROJECT_ROOT / "lib")}, timeout=60)
    assert child.returncode == -9
    assert dest.read_bytes() == labels["a"][0].read_bytes()  # the old label, whole
    assert len(list(dest.parent.glob(".*.partial"))) == 1  # the half-written one never had the label's name
    store = AtomicLocalDatastore(str(tiny_studies), auto_reload=False)  # the next start removes it
    assert not list(dest.parent.glob(".*.partial"))
    assert store.get_label_by_image_id(IMAGE, "final") == IMAGE


def test_a_label_saved_by_another_process_reaches_the_server(tiny_studies, sample_source, tmp_path):
    """Background jobs (training rounds) save labels from their own process: the renames reach the server."""
    from semisam_o1.server.atomic_datastore import AtomicLocalDatastore

    labels = variants(tiny_studies, sample_source, tmp_path)
    with Server(tiny_studies, env=QUIET) as server:
        job = AtomicLocalDatastore(str(tiny_studies), auto_reload=False)
        job.save_label(IMAGE, str(labels["b"][0]), "pseudo", {"round": 1})
        job.save_label(IMAGE, str(labels["b"][0]), "final", {})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
            if {"pseudo", "final"} <= set(objects[IMAGE]["labels"]):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the server does not see the labels saved by another process: {objects}")
