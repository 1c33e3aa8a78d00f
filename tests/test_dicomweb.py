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
from orthanc_harness import SHARED_DICOM, Orthanc, missing_binaries, nifti_to_dicom_series
from semisam_o1 import PROJECT_ROOT

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Orthanc missing: {', '.join(missing_binaries())} (CI installs them: make system-deps)"),
    pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"no DICOM test data at {SHARED_DICOM}"),
]

#: Small encoder settings: the app's paths, not its accuracy, are under test here.
FAST = ["--conf", "stage_one.encoder_image_size", "32", "--conf", "stage_one.encoder_axes", "0", "--conf", "stage_one.feature_dims", "8", "--conf", "stage_one.registration", "demons",
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
    label_file, result = client.infer("semisam_stage_one", pacs.target, {"label_tag": "original"})
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
        f"{server.url}/infer/semisam_stage_one", params={"image": pacs.target, "output": "dicom_seg"},
        data={"params": json.dumps({"label_info": label_info})}, timeout=120,
    )
    assert response.status_code == 200, response.text
    seg = pydicom.dcmread(io.BytesIO(response.content))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs.target
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"anterior", "posterior"}


def test_bad_input_and_orthanc_outage_are_clear_answers(pacs, server):
    def infer(uid):
        return requests.post(f"{server.url}/infer/semisam_stage_one", params={"image": uid}, data={"params": "{}"}, timeout=120)

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
    assert index.cookies.get("MONAILABEL_SERVER_URL") == f"{server.url}/ohif-api/"
    stale = requests.get(f"{server.url}/ohif/", cookies={"MONAILABEL_SERVER_URL": f"{server.url}/"}, timeout=10)
    assert stale.cookies.get("MONAILABEL_SERVER_URL") == f"{server.url}/ohif-api/"  # OHIF's default replaced
    chosen = requests.get(f"{server.url}/ohif/", cookies={"MONAILABEL_SERVER_URL": "http://elsewhere:8000/"}, timeout=10)
    assert "MONAILABEL_SERVER_URL" not in chosen.cookies  # a user's own choice is kept
    ohif_info = requests.get(f"{server.url}/ohif-api/info/", timeout=30).json()
    assert ohif_info["labels"] == ["anterior", "posterior"]  # OHIF's panel needs a list; /info/ keeps the map
    assert ohif_info["models"]["semisam_stage_one"]["labels"] == {"anterior": 1, "posterior": 2}
    assert len(requests.get(f"{server.url}/ohif-api/proxy/dicom/qido/studies", timeout=30).json()) >= 3  # the rest of the API under the prefix
    asset = requests.get(f"{server.url}/ohif/assets/favicon-16x16.png", timeout=10)
    assert asset.status_code == 200 and asset.headers["content-type"] == "image/png"
    config = requests.get(f"{server.url}/ohif/app-config.js", timeout=10)
    assert "/proxy/dicom/qido" in config.text
    outside = requests.get(f"{server.url}/ohif/..%2F..%2F__init__.py", timeout=10)
    assert outside.status_code == 404 and "import" not in outside.text  # never a file outside the OHIF folder
    studies = requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=10)
    assert studies.status_code == 200 and len(studies.json()) >= 3  # OHIF's DICOMweb proxy reaches Orthanc with the credentials


# ---- OHIF in a real browser ------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium driven by Selenium through Debian's chromedriver; no internet, no downloads."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium / chromedriver missing: apt-get install chromium chromium-driver (CI installs them: make system-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
                "--disable-extensions", "--metrics-recording-only", "--window-size=1600,1000",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist",
                "--proxy-server=http://127.0.0.1:9"]:  # anything but loopback fails (Chromium bypasses proxies for loopback)
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


VIEWPORT_RECTS = """
return [...document.querySelectorAll('canvas.cornerstone-canvas')].map(c => c.getBoundingClientRect())
  .filter(r => r.width > 50).map(r => ({x: r.x, y: r.y, width: r.width, height: r.height}));
"""


HIDE_BANNER = """
for (const b of document.querySelectorAll('button')) if (b.textContent.includes('Confirm and Hide')) b.click();
"""


def hide_banner(browser) -> None:
    """Dismiss OHIF's "investigational use" banner (it covers the viewports' lower part), in one script."""
    browser.execute_script(HIDE_BANNER)


def viewport_rects(browser) -> list[dict]:
    """The rectangles (CSS pixels, window coordinates) of the viewer's image canvases wider than 50 px.

    Read in one script so that a canvas cornerstone replaces while it loads a series cannot go stale between
    finding it and reading its size (a list of WebElements can: StaleElementReferenceException).
    """
    return browser.execute_script(VIEWPORT_RECTS)


def coloured_pixels(png: bytes, rects: list[dict]) -> int:
    """Clearly coloured pixels inside the viewports' canvases (the MR image is grey, segments are coloured)."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 25
    inside = np.zeros_like(coloured)
    for r in rects:
        inside[int(r["y"]):int(r["y"] + r["height"]), int(r["x"]):int(r["x"] + r["width"])] = True
    return int((coloured & inside).sum())


def test_ohif_study_list_to_segmentation_in_headless_chromium(pacs, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    started = time.monotonic()
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)
    shots = ARTIFACTS
    shots.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> bytes:
        png = browser.get_screenshot_as_png()
        (tmp_path / f"{name}.png").write_bytes(png)
        (shots / f"{name}.png").write_bytes(png)
        return png

    def click(xpath: str):
        element = wait.until(ec.element_to_be_clickable((By.XPATH, xpath)))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()
        return element

    try:
        # the study list, from Orthanc through MONAI Label's DICOMweb proxy
        browser.get(f"{server.url}/ohif/")
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Avasarala')]")))
        shot("ohif_1_study_list")
        click("//*[contains(text(), 'Avasarala')]")
        click("//button[contains(., 'MONAI Label')]")

        # the viewer with the MONAI Label panel: its server address comes from the app's cookie
        url_input = wait.until(ec.presence_of_element_located((By.ID, "monailabelServerURL")))
        assert url_input.get_attribute("value") == f"{server.url}/ohif-api/"
        shot("ohif_2_viewer")
        click("//input[@id='monailabelServerURL']/ancestor::tr//button")
        click("//label[contains(., 'Auto-Segmentation')]")
        hide_banner(browser)
        canvases = viewport_rects(browser)
        assert canvases, "no cornerstone viewport canvas"
        before = shot("ohif_3_connected")
        model = wait.until(ec.presence_of_element_located((By.XPATH, "//select[option[@value='semisam_stage_one']]")))
        Select(model).select_by_value("semisam_stage_one")
        click("//button[@title='Run Segmentation']")
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Running Segmentation - Successful')]")))
        time.sleep(6)  # the labelmap renders; the success notification (4 s) goes
        after = shot("ohif_4_segmentation")
    finally:
        (tmp_path / "console.log").write_text("\n".join(str(e) for e in browser.get_log("browser")))
        shutil.copy(tmp_path / "console.log", shots / "ohif_console.log")
    assert coloured_pixels(after, canvases) > coloured_pixels(before, canvases) + 500, f"no segmentation overlay appeared in {canvases}"
    assert "Infer Request: {'model': 'semisam_stage_one'" in server.log.read_text()  # the browser's request reached the app
    assert time.monotonic() - started < 300
