"""Orthanc as the studies source, end to end with real processes on loopback.

Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) is started from a configuration written here
(loopback only, DICOMweb on, basic authentication), the team's real DICOM series are uploaded, plus
the sample template (MSD ``hippocampus_001`` written as a DICOM series) and a text SR. The app is
started with ``--studies http://127.0.0.1:<port>/dicom-web``; its template is saved through the app
as a DICOM SEG. Internet access is blocked for the server and the browser (a dead proxy), so nothing
may be downloaded (MONAI Label's default DICOMweb datastore downloads dcmqi).
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from conftest import Server

from semisam_o1 import PROJECT_ROOT
from semisam_o1.orthanc import SHARED_DICOM, Orthanc, missing_binaries, nifti_to_dicom_series

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Orthanc missing: {', '.join(missing_binaries())} (CI installs them: make system-deps)"),
    pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"no DICOM test data at {SHARED_DICOM}"),
]

#: Small encoder settings: the app's paths, not its accuracy, are under test here.
FAST = ["--conf", "encoder_image_size", "32", "--conf", "encoder_axes", "0", "--conf", "feature_dims", "8",
        "--conf", "labels", "anterior=1,posterior=2"]
#: Any attempt to reach the internet fails at once; loopback goes direct.
NO_INTERNET = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"


def write_text_sr(path: Path, like: pydicom.Dataset) -> str:
    """A minimal Basic Text SR in the study of ``like``: a real non-image series. Returns its series UID."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sr_class = "1.2.840.10008.5.1.4.1.1.88.11"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sr_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = sr_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = like.PatientName, like.PatientID, like.StudyInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), "SR", 99, 1
    ds.SeriesDescription, ds.ValueType, ds.ContinuityOfContent = "Report", "CONTAINER", "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "No finding."
    item.ConceptNameCodeSequence = [concept]
    ds.ContentSequence = [item]
    ds.save_as(str(path), write_like_original=False)
    return str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, sample_source):
    """Orthanc with the shared DICOM series, the template series and an SR; stopped after the module."""
    work = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(work / "orthanc", username="semisam", password=secrets.token_hex(8))
    started = time.monotonic()
    orthanc.start()
    uploaded = orthanc.upload(SHARED_DICOM)
    template = nifti_to_dicom_series(sample_source.images / "hippocampus_001.nii.gz", work / "template", "Template^Hippocampus", "MSD hippocampus_001")
    orthanc.upload(work / "template")
    first = pydicom.dcmread(str(next((SHARED_DICOM / "Study1" / "13_HCropVolume").glob("*.dcm"))), stop_before_pixels=True)
    sr = write_text_sr(work / "sr.dcm", first)
    orthanc.upload(work / "sr.dcm")
    try:
        yield SimpleNamespace(
            orthanc=orthanc, template=template, target=str(first.SeriesInstanceUID), target_study=str(first.StudyInstanceUID),
            sr=sr, label=sample_source.labels / "hippocampus_001.nii.gz", uploaded=uploaded, work=work,
            setup_s=time.monotonic() - started,
        )
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def server(pacs):
    """The app on ``--studies <orthanc>/dicom-web`` with the template saved as a DICOM SEG through the app."""
    from monailabel.client import MONAILabelClient

    env = {
        "MONAI_LABEL_DICOMWEB_USERNAME": pacs.orthanc.auth[0],
        "MONAI_LABEL_DICOMWEB_PASSWORD": pacs.orthanc.auth[1],
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(pacs.work / "cache"),
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        **NO_INTERNET,
    }
    with Server(pacs.orthanc.dicomweb, *FAST, env=env, log_dir=pacs.work) as running:
        MONAILabelClient(running.url).save_label(pacs.template, str(pacs.label), tag="final")
        yield running


def seg_series(orthanc: Orthanc) -> dict[str, str]:
    """``{SEG series UID: referenced image series UID}`` stored in Orthanc."""
    out = {}
    for uid, tags in orthanc.series().items():
        if tags.get("Modality") == "SEG":
            study = tags["StudyInstanceUID"]
            meta = requests.get(f"{orthanc.dicomweb}/studies/{study}/series/{uid}/metadata", auth=orthanc.auth, timeout=10).json()[0]
            out[uid] = pydicom.Dataset.from_json(meta).ReferencedSeriesSequence[0].SeriesInstanceUID
    return out


def test_template_saved_through_the_app_is_a_dicom_seg_in_orthanc(pacs, server):
    assert pacs.template in seg_series(pacs.orthanc).values()
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["labels"] == {"anterior": 1, "posterior": 2}
    assert not (PROJECT_ROOT / "apps" / "semisam_o1" / "bin" / "itkimage2segimage").exists()
    assert "dcmqi" not in server.log.read_text()


def test_infer_on_an_orthanc_series_and_save_the_result_back_as_dicom_seg(pacs, server, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_file, result = client.infer("semisam_prototype", pacs.target, {"label_tag": "original"})
    assert result["templates"] == [pacs.template]
    label = sitk.ReadImage(label_file)
    series = sitk.ImageSeriesReader()
    series.SetFileNames(series.GetGDCMSeriesFileNames(str(SHARED_DICOM / "Study1" / "13_HCropVolume")))
    image = series.Execute()
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin()) and np.allclose(label.GetSpacing(), image.GetSpacing())
    values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
    assert values - {0} and values <= {0, 1, 2}, values

    # a clinician accepts it: saved as final -> a second DICOM SEG, referencing the target series
    client.save_label(pacs.target, label_file, tag="final")
    assert pacs.target in seg_series(pacs.orthanc).values()


def test_infer_answers_a_dicom_seg_with_pydicom_seg(pacs, server):
    label_info = [{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}]
    response = requests.post(
        f"{server.url}/infer/semisam_prototype", params={"image": pacs.target, "output": "dicom_seg"},
        data={"params": json.dumps({"label_info": label_info})}, timeout=120,
    )
    assert response.status_code == 200, response.text
    seg = pydicom.dcmread(io.BytesIO(response.content))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs.target
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"anterior", "posterior"}


def test_bad_input_and_orthanc_outage_are_clear_answers(pacs, server):
    def infer(uid):
        return requests.post(f"{server.url}/infer/semisam_prototype", params={"image": uid}, data={"params": "{}"}, timeout=120)

    unknown = "1.2.3.4.5.6.7.8.9"
    answer = infer(unknown)
    assert answer.status_code == 404 and unknown in answer.json()["detail"], answer.text
    answer = infer(pacs.target_study)  # a study UID where a series UID belongs
    assert answer.status_code == 404 and pacs.target_study in answer.json()["detail"] and "study UID" in answer.json()["detail"]
    answer = infer(pacs.sr)
    assert answer.status_code == 422 and "not an image series" in answer.json()["detail"] and "SR" in answer.json()["detail"], answer.text

    other = next(uid for uid, tags in pacs.orthanc.series().items() if tags.get("SeriesDescription") == "T1post")
    pacs.orthanc.stop()
    try:
        answer = infer(other)
        assert answer.status_code == 503, answer.text
        assert "unreachable" in answer.json()["detail"] and pacs.orthanc.dicomweb in answer.json()["detail"]
        assert server.process.poll() is None
        assert requests.get(f"{server.url}/ohif/", timeout=10).status_code == 200
    finally:
        pacs.orthanc.start()
    assert infer(pacs.target).status_code == 200  # back to normal once Orthanc is back


def test_ohif_assets_are_served_from_their_folders(server):
    index = requests.get(f"{server.url}/ohif/", timeout=10)
    assert index.status_code == 200 and "<html" in index.text
    assert index.cookies.get("MONAILABEL_SERVER_URL") == f"{server.url}/"
    asset = requests.get(f"{server.url}/ohif/assets/favicon-16x16.png", timeout=10)
    assert asset.status_code == 200 and asset.headers["content-type"] == "image/png"
    config = requests.get(f"{server.url}/ohif/app-config.js", timeout=10)
    assert "/proxy/dicom/qido" in config.text
    outside = requests.get(f"{server.url}/ohif/..%2F..%2F__init__.py", timeout=10)
    assert "<html" in outside.text  # never a file outside the OHIF folder
    studies = requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=10)
    assert studies.status_code == 200 and len(studies.json()) >= 3  # OHIF's DICOMweb proxy reaches Orthanc with the credentials
