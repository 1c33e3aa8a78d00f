"""A private Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback, and DICOM to put in it.

A test harness (the tests and the DICOMweb benchmark), not part of the package; the README's "Use with OHIF + Orthanc" shows the same
configuration for a real installation. Orthanc runs as a child process with its own configuration
file and storage folder, never as the system service::

    with Orthanc(tmp_dir, username="semisam", password="...") as orthanc:
        orthanc.upload(Path("../shared/data/dicom/Study1"))
        print(orthanc.dicomweb)            # http://127.0.0.1:<port>/dicom-web
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import requests
from child_process import ChildProcess
from semisam_o1 import PROJECT_ROOT
from semisam_o1.distributed import free_port

#: Where Debian's ``orthanc-dicomweb`` installs the plugin (``dpkg -L orthanc-dicomweb``).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The team's real DICOM series (read-only), beside the checkout.
SHARED_DICOM = PROJECT_ROOT.parent / "shared" / "data" / "dicom"


def missing_binaries() -> list[str]:
    """What this module needs and the machine lacks (Debian packages named)."""
    missing = []
    if not shutil.which("Orthanc"):
        missing.append("Orthanc (apt-get install orthanc)")
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"{DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb)")
    return missing


def orthanc_config(storage: Path, http_port: int, dicom_port: int, username: str = "", password: str = "") -> dict:
    """Orthanc configuration: loopback only, DICOMweb on, basic authentication when a user is given."""
    return {
        "Name": "SemiSAM-O1",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "SEMISAM",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(username),
        "RegisteredUsers": {username: password} if username else {},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "StableAge": 1,
        "OverwriteInstances": True,
    }


class Orthanc(ChildProcess):
    """``Orthanc <config.json>`` as a child process on free loopback ports; stopped on exit."""

    def __init__(self, workdir: Path, username: str = "", password: str = "", start_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth = (username, password) if username else None
        self.config = self.workdir / "orthanc.json"
        self.log = self.workdir / "orthanc.log"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self._started_once = False
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.http_port = free_port()
        self.dicom_port = next(p for p in iter(free_port, None) if p != self.http_port)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        user, password = self.auth or ("", "")
        self.config.write_text(json.dumps(orthanc_config(self.workdir / "storage", self.http_port, self.dicom_port, user, password), indent=2))

    def start(self) -> float:
        """Start and wait until the REST API answers; returns the seconds it took.

        A port taken by another process between choosing and binding it: new ports, up to 3 tries
        (only before the first successful start: a restart keeps the URL the app was given).
        """
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Orthanc is not installed: {', '.join(missing)}")
        for attempt in range(3):
            try:
                return self._start_once()
            except RuntimeError as e:
                if self._started_once or attempt == 2 or "exited" not in str(e):
                    raise
                self._choose_ports()
        raise AssertionError("unreachable")

    def _start_once(self) -> float:
        self._log_file = open(self.log, "ab")
        self.process = subprocess.Popen(["Orthanc", str(self.config)], cwd=self.workdir, stdout=self._log_file, stderr=subprocess.STDOUT)
        seconds = self.wait_ready("Orthanc", lambda: requests.get(f"{self.dicomweb}/studies", auth=self.auth, timeout=2).status_code == 200, 0.2)
        self._started_once = True
        return seconds

    def stop(self) -> None:
        super().stop()
        self.process = None  # a restart (start()) makes a new one

    def upload(self, path: Path) -> int:
        """POST every DICOM file under ``path`` (a file or a folder) to Orthanc's REST API; returns the count."""
        files = [path] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
        with requests.Session() as session:
            session.auth = self.auth
            for f in files:
                response = session.post(f"{self.url}/instances", data=f.read_bytes(), timeout=30)
                response.raise_for_status()
        return len(files)

    def series(self) -> dict[str, dict]:
        """``{SeriesInstanceUID: main DICOM tags}`` of everything stored."""
        out = {}
        for orthanc_id in requests.get(f"{self.url}/series", auth=self.auth, timeout=10).json():
            tags = requests.get(f"{self.url}/series/{orthanc_id}", auth=self.auth, timeout=10).json()
            study = requests.get(f"{self.url}/studies/{tags['ParentStudy']}", auth=self.auth, timeout=10).json()
            out[tags["MainDicomTags"]["SeriesInstanceUID"]] = {**tags["MainDicomTags"], "StudyInstanceUID": study["MainDicomTags"]["StudyInstanceUID"]}
        return out


def nifti_to_dicom_series(nifti: Path, out_dir: Path, patient: str, series_description: str, modality: str = "MR") -> str:
    """Write a 3D NIfTI image as a DICOM series (one MR Image Storage file per slice); returns its SeriesInstanceUID.

    For demonstrations and tests: the sample template (an MSD NIfTI) becomes a series Orthanc can
    serve, with the same physical geometry, so its NIfTI label can be saved as its DICOM SEG.
    """
    import datetime

    import SimpleITK as sitk
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from semisam_o1.volumes import read_sitk

    image = read_sitk(nifti)
    array = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)  # (z, y, x)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = image.GetSpacing(), np.array(image.GetOrigin())
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    out_dir.mkdir(parents=True, exist_ok=True)
    for z in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient, patient.replace("^", "")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = today
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, z + 1
        ds.Modality, ds.SeriesDescription, ds.StudyDescription = modality, series_description, series_description
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in origin + z * spacing[2] * direction[:, 2]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = array[z].tobytes()
        ds.save_as(str(out_dir / f"{z + 1:04d}.dcm"), write_like_original=False)
    return series
