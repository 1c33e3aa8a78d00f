"""No request id, tag or file name reaches the filesystem outside the datastore (a real server process).

Every endpoint that takes an id or a tag gets parent references, absolute paths, encoded separators
and NUL bytes, sent byte for byte with ``http.client`` (HTTP libraries would normalise ``..``):
every answer must be 4xx, nothing may appear or change outside the datastore folder, and the
clinician's label and the image list must be untouched.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Server
from fastapi import HTTPException
from semisam_o1.safe_names import UnsafeNameError, dicom_uid, safe_name
from test_server import QUIET
from urllib3 import encode_multipart_formdata

pytestmark = pytest.mark.server

TEMPLATE, POOL = "hippocampus_001", "hippocampus_003"


def bad_values(outside: Path) -> list[str]:
    """Names a client may send to reach ``outside`` or anything else beyond the datastore."""
    return ["..", "../x", "../../x", "../../../../x", str(outside / "x"), "..\\..\\x", "x\x00y", f"{POOL}/../../x", ".x"]


def encodings(value: str) -> set[str]:
    """The value fully percent-encoded (``%2F``, ``%5C``, ``%00``) and with raw ``/``."""
    return {quote(value, safe=""), quote(value, safe="/")}


def tree(root: Path, skip: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file and folder under ``root``, except inside ``skip``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


class Raw:
    """Requests sent exactly as written (``http.client`` only refuses raw control characters)."""

    def __init__(self, port: int):
        self.port = port

    def __call__(self, method: str, target: str, files: dict | None = None, form: dict | None = None) -> tuple[int, str]:
        body, headers = None, {}
        if files or form:
            body, content_type = encode_multipart_formdata({**(form or {}), **(files or {})})
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_source):
    """A server on a datastore four folders deep, so '../' chains stay inside this test's folder."""
    root = tmp_path_factory.mktemp("traversal")
    studies = root / "a" / "b" / "c" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in (TEMPLATE, POOL):
        shutil.copy(sample_source.images / f"{case}.nii.gz", studies)
    shutil.copy(sample_source.labels / f"{TEMPLATE}.nii.gz", studies / "labels" / "final")
    fast = ["--conf", "stage_one.encoder_image_size", "32", "--conf", "stage_one.encoder_axes", "0", "--conf", "stage_one.feature_dims", "8", "--conf", "stage_one.registration", "demons"]
    with Server(studies, *fast, env=QUIET, log_dir=tmp_path_factory.mktemp("traversal-log")) as server:
        yield server, root, studies, sample_source


def attacks(image: bytes, label: bytes, outside: Path):
    """``(method, target, files, form)`` for every endpoint and parameter that names a file."""
    nii = "application/octet-stream"
    for value in bad_values(outside):
        for v in encodings(value):
            yield "PUT", f"/datastore/?image={v}", {"file": ("upload.nii.gz", image, nii)}, None
            yield "PUT", f"/datastore/image?image={v}", {"file": ("upload.nii.gz", image, nii)}, None
            yield "PUT", f"/datastore/label?image={v}&tag=final", {"label": ("l.nii.gz", label, nii)}, None
            yield "PUT", f"/datastore/label?image={POOL}&tag={v}", {"label": ("l.nii.gz", label, nii)}, None
            yield "DELETE", f"/datastore/?id={v}", None, None
            yield "DELETE", f"/datastore/image?id={v}", None, None
            yield "DELETE", f"/datastore/label?id={v}&tag=final", None, None
            yield "DELETE", f"/datastore/label?id={TEMPLATE}&tag={v}", None, None
            yield "GET", f"/datastore/image?image={v}", None, None
            yield "HEAD", f"/datastore/image?image={v}", None, None
            yield "GET", f"/datastore/label?label={v}&tag=final", None, None
            yield "GET", f"/datastore/label?label={TEMPLATE}&tag={v}", None, None
            yield "GET", f"/datastore/image/info?image={v}", None, None
            yield "PUT", f"/datastore/image/info?image={v}", None, {"info": "{}"}
            yield "GET", f"/datastore/label/info?label={TEMPLATE}&tag={v}", None, None
            yield "PUT", f"/datastore/label/info?label={v}&tag=final", None, {"info": "{}"}
            yield "POST", f"/infer/semisam_stage_one?image={v}&output=json", None, None
            yield "POST", f"/infer/semisam_stage_one?image={POOL}&output=json", None, {"params": json.dumps({"image": value})}
            yield "POST", f"/infer/semisam_stage_one?session_id={v}&output=json", None, None
            yield "POST", f"/infer/semisam_stage_one?image={POOL}&output=json", None, {"params": json.dumps({"result_extension": f".nii/{value}"})}
            yield "POST", f"/infer/{v}?image={POOL}&output=json", None, None
            yield "POST", f"/activelearning/{v}", None, None
            yield "POST", f"/scoring/{v}", None, None
            yield "POST", f"/train/{v}", None, None
            yield "GET", f"/session/{v}", None, None
            yield "DELETE", f"/session/{v}", None, None
            if value != ".x":  # a dotted name under /ohif/ is a client-side route: index.html
                yield "GET", f"/ohif/{v}", None, None
    for name in ["..\\..\\x.nii.gz", ".x.nii.gz", "x.sh"]:  # upload file names (MONAI Label keeps the basename as id)
        yield "PUT", "/datastore/", {"file": (name, image, nii)}, None


def test_no_request_reaches_outside_the_datastore(served):
    server, root, studies, source = served
    send = Raw(server.port)
    image, label = (source.images / f"{POOL}.nii.gz").read_bytes(), (source.labels / f"{POOL}.nii.gz").read_bytes()
    final = studies / "labels" / "final" / f"{TEMPLATE}.nii.gz"
    template_label = final.read_bytes()
    images_before = sorted(p.name for p in studies.glob("*.nii.gz"))
    outside_before = tree(root, skip=studies)

    answers = [(method, target, *send(method, target, files, form)) for method, target, files, form in attacks(image, label, root)]

    wrong = [(m, t, s, b[:160]) for m, t, s, b in answers if not 400 <= s < 500]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers not 4xx: {wrong[:10]}"
    assert tree(root, skip=studies) == outside_before
    assert final.read_bytes() == template_label
    assert sorted(p.name for p in studies.glob("*.nii.gz")) == images_before
    assert sorted(p.name for p in (studies / "labels").iterdir()) == ["final", "original"]
    # the answer names the parameter
    status, body = send("PUT", f"/datastore/label?image={POOL}&tag={quote('../../x', safe='')}", {"label": ("l.nii.gz", label, "")})
    assert status == 422 and "label tag '../../x' is not allowed" in body


def test_unknown_ids_are_404_naming_them(served):
    server, *_ = served
    send = Raw(server.port)
    status, body = send("DELETE", "/datastore/?id=no_such_image")
    assert status == 404 and "no_such_image" in body
    status, body = send("DELETE", "/datastore/label?id=no_such_image&tag=final")
    assert status == 404 and "no_such_image" in body
    status, body = send("PUT", "/datastore/image/info?image=no_such_image", form={"info": "{}"})
    assert status == 404 and "no_such_image" in body


def test_safe_names_accept_real_ids_and_refuse_paths():
    for ok in ["hippocampus_001", "final", "pseudo", "1.2.840.113619.2.55.3", "case-07.v2"]:
        assert safe_name("image id", ok) == ok
    for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "/abs", "a\x00b", "a..b", "x" * 129, "a\n", "a b"]:
        with pytest.raises(UnsafeNameError, match="image id"):
            safe_name("image id", bad)
    assert dicom_uid("series", "1.2.840.10008.5.1.4.1.1.4") == "1.2.840.10008.5.1.4.1.1.4"
    for bad in ["1..2", "1.2.", ".1", "1/2", "../1", "1" * 65, "1.2a"]:
        with pytest.raises(UnsafeNameError, match="series"):
            dicom_uid("series", bad)


def test_dicomweb_ids_must_be_uids_before_any_path(tmp_path, monkeypatch):
    """A DICOMweb datastore refuses a non-UID series id (422) before touching its cache or the server."""
    from monailabel.config import settings
    from semisam_o1.distributed import free_port
    from semisam_o1.server.dicomweb import dicomweb_datastore

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_CACHE_PATH", str(tmp_path / "cache"))
    datastore = dicomweb_datastore(f"http://127.0.0.1:{free_port()}/dicom-web")  # nothing listens there
    before = sorted(tmp_path.rglob("*"))
    for call in (lambda: datastore.get_image_uri("1.2/../../x"), lambda: datastore.get_label_uri("../x", "final"),
                 lambda: datastore.save_label("1.2.3", str(tmp_path / "l.nii.gz"), "../x", {}),
                 lambda: datastore.get_image_uri("1.2.3\x00")):
        with pytest.raises(HTTPException) as e:
            call()
        assert e.value.status_code == 422
    assert sorted(tmp_path.rglob("*")) == before
    assert datastore.get_label_info("1.2.3", "pseudo") == {}  # a real UID passes the check


def test_batch_infer_takes_only_datastore_ids(tiny_studies):
    """``POST /batch/infer`` with ``images: [<server path>]`` would make MONAI Label read that file."""
    from semisam_o1.server.template_datastore import TemplateDatastore
    from semisam_o1.tasks.pseudo_labels import PseudoLabelBatchInfer
    from semisam_o1.volumes import InputError

    datastore = TemplateDatastore(str(tiny_studies), label_values=lambda: None)
    batch = PseudoLabelBatchInfer()
    assert batch.get_images({"images": [POOL]}, datastore) == [POOL]
    with pytest.raises(InputError, match="'/etc/hostname'"):
        batch.get_images({"images": [POOL, "/etc/hostname"]}, datastore)


def test_session_archive_members_stay_in_their_folder(served):
    """``PUT /session/?uncompress=true``: a tar member never lands outside the session's folder.

    An absolute member name is made relative (it lands inside); a '..' one is refused with 422.
    """
    import io
    import tarfile

    server, root, studies, _ = served
    send = Raw(server.port)
    target = root / "from_session.txt"
    image = next(studies.glob("*.nii.gz"))
    for member in (str(target), "../../../../../../../../" + str(target).lstrip("/")):
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            info = tarfile.TarInfo(member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
            tar.add(str(image), arcname="scan.nii.gz")  # a session must hold an image the app can read
        status, body = send("PUT", "/session/?uncompress=true", {"files": ("study.tar", data.getvalue(), "application/x-tar")})
        assert not target.exists()
        if member.startswith("/"):
            assert status == 200, body
            assert send("DELETE", f"/session/{json.loads(body)['session_id']}")[0] == 200
        else:
            assert status == 422 and "cannot be unpacked safely" in body, body


@pytest.mark.parametrize("path", ["../../../etc/passwd", "/etc/passwd", "js/../../../etc/passwd", "..", "js\\..\\..\\x", "app.js\x00.html"])
def test_ohif_paths_never_leave_the_bundle(path, tmp_path, monkeypatch):
    import semisam_o1.server.web as web

    bundle = tmp_path / "ohif"
    (bundle / "js").mkdir(parents=True)
    (bundle / "index.html").write_text("<html></html>")
    (bundle / "js" / "app.js").write_text("//")
    monkeypatch.setattr(web, "OHIF_DIR", bundle)
    assert web.ohif_file(path) is None


def test_ohif_files_and_pages_resolve_inside_the_bundle_only(tmp_path, monkeypatch):
    import semisam_o1.server.web as web

    bundle = tmp_path / "ohif"
    (bundle / "js").mkdir(parents=True)
    (bundle / "index.html").write_text("<html></html>")
    (bundle / "js" / "app.js").write_text("//")
    secret = tmp_path / "secret.txt"
    secret.write_text("not OHIF")
    (bundle / "leak").symlink_to(secret)  # a link inside the bundle to a file outside it
    monkeypatch.setattr(web, "OHIF_DIR", bundle)
    assert web.ohif_file("js/app.js") == (bundle / "js" / "app.js").resolve()
    assert web.ohif_file("viewer/1.2.3") == bundle.resolve() / "index.html"  # a page of the single-page app
    assert web.ohif_file("") == bundle.resolve() / "index.html"
    assert web.ohif_file("leak") == bundle.resolve() / "index.html"
