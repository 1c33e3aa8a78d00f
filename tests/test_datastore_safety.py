"""A clinician's data is never replaced or lost by a request: image re-uploads, unreadable final
labels, DICOM SEG answers that leave no file behind (the app in-process, MONAI Label's own endpoints)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_stage_two import FAST, make_client

TEMPLATE = "hippocampus_001"
POOL = "hippocampus_003"


@pytest.fixture()
def client(tiny_studies, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as c:
        yield c


def upload(client, image_id, path):
    with open(path, "rb") as f:
        return client.put("/datastore/", params={"image": image_id}, files={"file": (path.name, f)})


def test_reuploading_an_image_with_other_content_is_409_and_changes_nothing(client, tiny_studies):
    image, label = tiny_studies / f"{TEMPLATE}.nii.gz", tiny_studies / "labels" / "final" / f"{TEMPLATE}.nii.gz"
    before = image.read_bytes(), label.read_bytes()

    res = upload(client, TEMPLATE, tiny_studies / f"{POOL}.nii.gz")
    assert res.status_code == 409, res.text
    assert f"image '{TEMPLATE}' is already in the datastore" in res.json()["detail"] and "final" in res.json()["detail"]
    assert (image.read_bytes(), label.read_bytes()) == before

    same = tiny_studies.parent / f"{TEMPLATE}.nii.gz"  # the same bytes again: accepted, nothing changes
    same.write_bytes(before[0])
    assert upload(client, TEMPLATE, same).status_code == 200
    assert (image.read_bytes(), label.read_bytes()) == before
    assert client.get("/datastore/label", params={"label": TEMPLATE, "tag": "final"}).content == before[1]

    new = upload(client, "hippocampus_new", tiny_studies / f"{POOL}.nii.gz")  # a new id still works
    assert new.status_code == 200, new.text
    assert (tiny_studies / "hippocampus_new.nii.gz").read_bytes() == (tiny_studies / f"{POOL}.nii.gz").read_bytes()


def test_an_unreadable_final_label_is_skipped_in_info_and_kept(tiny_studies, sample_source, monkeypatch, caplog):
    (tiny_studies / "labels" / "final" / f"{POOL}.nii.gz").write_bytes((sample_source.labels / f"{POOL}.nii.gz").read_bytes())
    client = make_client(tiny_studies, monkeypatch, FAST).__enter__()
    corrupt = tiny_studies / "labels" / "final" / f"{TEMPLATE}.nii.gz"
    truncated = corrupt.read_bytes()[:300]  # (the whole gzip file is ~800 bytes)
    corrupt.write_bytes(truncated)  # e.g. a disk fault, or a copy interrupted outside the app

    with caplog.at_level(logging.WARNING, logger="semisam_o1.templates"):
        res = client.get("/info/")
    assert res.status_code == 200, res.text
    assert res.json()["labels"] == {"anterior": 1, "posterior": 2}
    assert any(str(corrupt) in r.getMessage() and TEMPLATE in r.getMessage() for r in caplog.records), caplog.text
    assert corrupt.read_bytes() == truncated  # never deleted nor rewritten
    assert client.get("/datastore/label", params={"label": TEMPLATE, "tag": "final"}).content == truncated
    client.__exit__(None, None, None)


def test_dicom_seg_answer_leaves_no_file_behind(tmp_path):
    """MONAI Label's own ``send_response`` with the server's ASGI app installed: the SEG file is deleted once sent."""
    import semisam_o1.server.web  # noqa: F401  (installs the server's changes, as `main.py serve` does)
    from fastapi import BackgroundTasks
    from monailabel.endpoints import infer as infer_endpoint

    label, seg = tmp_path / "label.nii.gz", tmp_path / "result.dcm"
    label.write_bytes(b"label")
    seg.write_bytes(b"DICM")
    tasks = BackgroundTasks()
    response = infer_endpoint.send_response(None, {"file": str(label), "dicom_seg": str(seg), "params": {}}, "dicom_seg", tasks)
    assert response.path == str(seg)
    asyncio.run(tasks())  # what Starlette runs after the response is sent
    assert not seg.exists() and not label.exists()


def test_rejected_uploads_leave_no_file_behind(tiny_studies, tmp_path, monkeypatch):
    """MONAI Label writes each upload to a temporary file and deletes it after answering; a request
    answered with an error deleted nothing, so every rejected upload stayed on the server's disk."""
    import io
    import tarfile
    import tempfile

    scratch = tmp_path / "server-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    garbage = b"not a NIfTI volume" * 100
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("../escape.nii.gz")
        info.size = len(garbage)
        tar.addfile(info, io.BytesIO(garbage))
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        before = sorted(p.name for p in scratch.iterdir())
        answers = [
            upload(client, TEMPLATE, tiny_studies / f"{POOL}.nii.gz"),  # another image under the template's id: 409
            client.put("/datastore/label", params={"image": POOL, "tag": "final"}, files={"label": ("l.nii.gz", garbage)}),
            client.post("/infer/semisam_stage_one", params={"output": "json"}, files={"file": ("x.nii.gz", garbage)}),
            client.put("/session/", params={"uncompress": True}, files={"files": ("study.tar", archive.getvalue())}),
        ]
        assert [a.status_code for a in answers] == [409, 422, 422, 422], [a.text for a in answers]
        assert sorted(p.name for p in scratch.iterdir()) == before

        accepted = upload(client, "hippocampus_new", tiny_studies / f"{POOL}.nii.gz")  # and an accepted one, as before
        assert accepted.status_code == 200, accepted.text
        assert sorted(p.name for p in scratch.iterdir()) == before
