"""Uploads are checked at the door: every endpoint that takes an image, a session or model weights refuses a bad one
with a 4xx naming it (never a server path) and keeps nothing of it; pool jobs skip an image placed by hand that cannot
be read and name it (the app in-process, MONAI Label's own endpoints)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from test_datastore_safety import client, upload  # noqa: F401  (client: the app in-process, as there)
from test_stage_two import FAST, make_client

POOL = "hippocampus_003"
#: an absolute path of this machine in an answer
SERVER_PATH = re.compile(r"(?<![\w:/.])/(tmp|work|root|home|srv|var)/")


def header_bomb(path, shape=(3000, 3000, 3000)):
    """A 352-byte NIfTI header that declares ``shape`` float32 voxels and holds none."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def bad_images(tmp_path, tiny_studies):
    good = nib.load(str(tiny_studies / f"{POOL}.nii.gz"))
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is a text file with a NIfTI name")
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full(good.shape, np.nan, np.float32), good.affine), str(nan))
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((*good.shape, 2)).astype(np.float32), good.affine), str(two))
    flat = tmp_path / "flat.nii.gz"  # a NaN in the voxel -> mm matrix (nibabel refuses to write one: patched header)
    image = nib.Nifti1Image(np.asarray(good.dataobj, np.float32), good.affine)
    image.header["srow_x"], image.header["sform_code"], image.header["qform_code"] = [np.nan, 0, 0, 0], 1, 0
    image.update_header = lambda: None
    nib.save(image, str(flat))
    return {"text": (text, 422, "not a readable NIfTI image"), "bomb": (header_bomb(tmp_path / "bomb.nii.gz"), 413, "voxels"),
            "nan": (nan, 422, "NaN"), "two_channels": (two, 422, "3D volume"), "no_geometry": (flat, 422, "affine")}


def test_a_bad_image_upload_is_refused_naming_the_image_and_nothing_is_kept(client, tiny_studies, tmp_path):
    before = sorted(p.name for p in tiny_studies.iterdir())
    for name, (path, status, words) in bad_images(tmp_path, tiny_studies).items():
        res = upload(client, f"bad_{name}", path)
        assert res.status_code == status, (name, res.text)
        detail = res.json()["detail"]
        assert f"image 'bad_{name}'" in detail and words in detail, (name, detail)
        assert not SERVER_PATH.search(detail), detail
    assert sorted(p.name for p in tiny_studies.iterdir()) == before
    listed = client.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert not any(i.startswith("bad_") for i in listed)  # no strategy can pick them
    assert upload(client, "good_copy", tiny_studies / f"{POOL}.nii.gz").status_code == 200


def test_an_uploaded_image_to_infer_and_a_session_pass_the_same_check(client, tiny_studies, tmp_path):
    cases = bad_images(tmp_path, tiny_studies)
    with open(cases["bomb"][0], "rb") as f:
        res = client.post("/infer/semisam_stage_one", params={"output": "json"}, files={"file": ("scan.nii.gz", f)})
    assert res.status_code == 413, res.text
    assert "uploaded image" in res.json()["detail"] and not SERVER_PATH.search(res.json()["detail"])
    with open(cases["text"][0], "rb") as f:
        res = client.put("/session/", files={"files": ("scan.nii.gz", f)})
    assert res.status_code == 422, res.text
    assert "session file" in res.json()["detail"] and not SERVER_PATH.search(res.json()["detail"])
    with open(tiny_studies / f"{POOL}.nii.gz", "rb") as f:
        assert client.put("/session/", files={"files": ("scan.nii.gz", f)}).status_code == 200


def test_model_upload_replaces_the_weights_only_with_a_checkpoint_of_that_model(client, tiny_studies, tmp_path):
    from semisam_o1.stage_two.network import build_network, save_network
    from semisam_o1.stage_two.params import TrainParams

    model = tiny_studies / ".semisam" / "stage2" / "model.pt"

    def put_model(name, path):
        with open(path, "rb") as f:
            return client.put(f"/model/{name}", files={"file": (path.name, f)})

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    res = put_model("semisam_o1", garbage)
    assert res.status_code == 422 and "uploaded model" in res.json()["detail"], res.text
    wrong = tmp_path / "wrong.pt"
    save_network(build_network(5, TrainParams()), 5, wrong)  # 5 classes; this datastore has background + 2
    res = put_model("semisam_o1", wrong)
    assert res.status_code == 422 and "5 classes" in res.json()["detail"], res.text
    pickled = tmp_path / "pickled.pt"
    torch.save({"n_classes": 3, "payload": Path("anything")}, pickled)  # an object weights-only loading refuses
    assert put_model("semisam_o1", pickled).status_code == 422
    assert not model.exists()  # nothing was served instead
    assert put_model("semisam_stage_one", garbage).status_code == 422  # stage one has no weights
    assert put_model("nonexistent", garbage).status_code == 404

    good = tmp_path / "good.pt"
    save_network(build_network(3, TrainParams()), 3, good)
    res = put_model("semisam_o1", good)
    assert res.status_code == 200, res.text
    assert model.read_bytes() == good.read_bytes()
    assert put_model("semisam_o1", garbage).status_code == 422
    assert model.read_bytes() == good.read_bytes()  # a refused upload keeps the model that was served
    assert client.get("/model/semisam_o1").content == good.read_bytes()


def test_pool_jobs_skip_an_unreadable_image_placed_by_hand_and_name_it(tiny_studies, monkeypatch):
    header_bomb(tiny_studies / "zz_bomb.nii.gz", (64, 64, 64))  # a header with no voxels, copied in outside the app
    (tiny_studies / "zz_text.nii.gz").write_text("not an image")
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = client.post("/scoring/features", params={"run_sync": True})
        assert res.status_code == 200, res.text
        info = client.get("/info/").json()["semisam"]["unreadable_images"]
    assert set(info) == {"zz_bomb", "zz_text"}
    assert all(not SERVER_PATH.search(reason) for reason in info.values()), info

    from semisam_o1.config import AppConfig
    from semisam_o1.pipeline import run_stage_one

    report = run_stage_one(tiny_studies, AppConfig.from_conf(FAST), progress=False)
    assert set(report["errors"]) == {"zz_bomb", "zz_text"} and report["images"] >= 1  # the others were labelled
    assert (tiny_studies / "zz_bomb.nii.gz").exists()  # never deleted


def test_a_normal_start_logs_no_exception_text():
    """FAISS logs each CPU build it probes and misses with the ImportError's text; the app's log stays clean (the
    app's modules are imported as the server imports them, at INFO, in a fresh process where FAISS is not loaded)."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.INFO); import semisam_o1; "
            "import semisam_o1.stage_one.feature_cache, semisam_o1.stage_two.refinement")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ModuleNotFoundError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
