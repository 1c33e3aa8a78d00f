"""A DICOMweb server (e.g. Orthanc) as the studies source, without dcmqi and without any other network.

MONAI Label 0.8.5's :class:`~monailabel.datastore.dicom.DICOMWebDatastore` downloads dcmqi from
GitHub at start-up and converts labels to DICOM SEG with its ``itkimage2segimage`` binary. This
module replaces that with pydicom-seg (already a MONAI Label dependency) and gives the rest of the
library what it reads: real NIfTI files.

- image: the series (id = SeriesInstanceUID) is downloaded once into the cache folder
  (``<cache>/<series>/*.dcm``, atomically) and converted once to ``<cache>/<series>.nii.gz`` with
  SimpleITK, so the feature cache (content hash) and registrations see a stable file;
- template label: a DICOM SEG series on the server whose ReferencedSeriesSequence names an image
  series is that image's ``final`` label; it is converted once to NIfTI on the image's exact grid
  (``<cache>/seg/<seg series>.nii.gz``);
- saving a ``final`` label writes a DICOM SEG (one segment per label value, named after the app's
  label map) and stores it on the server (STOW-RS).

Ids are DICOM UIDs: every id is checked against the DICOM UID grammar, every tag and file name against
:func:`~semisam_o1.safe_names.safe_name`, before it becomes a path in the cache folder
(:class:`SafeDICOMwebSource`): a bad one is answered 422.

Failures of the source become HTTP answers (they are :class:`fastapi.HTTPException`, which MONAI
Label's endpoints pass through): unknown series UID -> 404 naming it; server unreachable -> 503;
a series without pixel data (SR, KO, PR...) -> 422; the server refusing us -> 502.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import md5_digest
from pydicom.dataset import Dataset

from semisam_o1.config import is_dicomweb
from semisam_o1.safe_names import dicom_uid
from semisam_o1.server.safe_datastore import NameChecks
from semisam_o1.volumes import atomic_write, read_sitk

logger = logging.getLogger(__name__)

#: Seconds a listing of the server (series, SEG series) is reused before asking again.
LISTING_TTL = 10.0
SERIES_UID = "0020000E"
STUDY_UID = "0020000D"


def cache_root(url: str) -> Path:
    """Where MONAI Label (and this module) keep downloaded series of ``url``, as DICOMWebDatastore does."""
    from monailabel.config import settings

    base = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    base = base or os.path.join(Path.home(), ".cache", "monailabel", "dicom")
    return Path(base) / md5_digest(url)


def work_dir(studies: str | Path) -> Path:
    """Folder for the app's own caches (``.semisam``): the datastore folder, or the DICOMweb cache folder."""
    return cache_root(str(studies)) if is_dicomweb(studies) else Path(studies)


class SourceError(HTTPException):
    """A failure of the DICOMweb source, answered to the client with its HTTP status."""


@contextmanager
def source_errors(url: str, what: str):
    """Turn errors of requests to the DICOMweb server into :class:`SourceError` (503 / 404 / 502)."""
    try:
        yield
    except SourceError:
        raise
    except (requests.ConnectionError, requests.Timeout) as e:
        raise SourceError(503, f"DICOMweb server {url} is unreachable while {what} ({type(e).__name__}); "
                               "check that it (e.g. Orthanc) is running and that --studies is right") from None
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status == 404:
            raise SourceError(404, f"DICOMweb server {url}: not found while {what}") from None
        raise SourceError(502, f"DICOMweb server {url} answered HTTP {status} while {what}"
                               f"{' (check MONAI_LABEL_DICOMWEB_USERNAME/PASSWORD)' if status in (401, 403) else ''}") from None


def series_to_nifti(series_dir: Path, out: Path, series_uid: str) -> Path:
    """Convert a downloaded image series to NIfTI (SimpleITK/GDCM, slices sorted by position).

    Raises:
        SourceError: 422 when the series holds no image (e.g. an SR or a SEG) or cannot be read.
    """
    import pydicom
    import SimpleITK as sitk

    files = sorted(series_dir.glob("*.dcm"))
    heads = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    if not heads or not any("Rows" in h and "Columns" in h for h in heads) or heads[0].get("Modality") == "SEG":
        kinds = sorted({f"{h.get('Modality', '?')} ({getattr(h.get('SOPClassUID'), 'name', h.get('SOPClassUID'))})" for h in heads})
        raise SourceError(422, f"series {series_uid} is not an image series: {', '.join(kinds) or 'no instances'}; "
                               "choose a series of images (MR/CT)")
    try:
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(series_dir), series_uid) or reader.GetGDCMSeriesFileNames(str(series_dir))
        reader.SetFileNames(names)
        image = reader.Execute()
    except RuntimeError as e:
        raise SourceError(422, f"series {series_uid}: its images cannot be read as one volume ({str(e).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise SourceError(422, f"series {series_uid} is not a 3D volume (size {image.GetSize()})")
    return atomic_write(out, lambda tmp: sitk.WriteImage(image, str(tmp), True))


def seg_to_label(seg_file: Path, image_nifti: Path, out: Path) -> Path:
    """A DICOM SEG (multi-class) as a uint8 NIfTI label on the exact grid of ``image_nifti``."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    seg = pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(seg_file))).image
    reference = read_sitk(image_nifti)
    label = sitk.Cast(sitk.Resample(seg, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    return atomic_write(out, lambda tmp: sitk.WriteImage(label, str(tmp), True))


#: Segment colours for names MONAI Label's ``GENERIC_ANATOMY_COLORS`` does not know.
PALETTE = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def label_to_seg(label_file: str | Path, image_nifti: Path, series_dir: Path, names: dict[str, int], out: Path) -> Path:
    """Write a label (any format SimpleITK reads, on the image's grid) as a multi-class DICOM SEG at ``out``.

    One segment per non-zero value of the label, named from ``names`` (``label_<value>`` otherwise),
    referencing the instances of ``series_dir`` (``*.dcm``). The writer is MONAI Label's
    :func:`~monailabel.datastore.utils.convert.nifti_to_dicom_seg` with pydicom-seg (``use_itk=False``: no
    dcmqi); this wrapper first puts the label on the image's exact grid (same size required; header
    differences such as a NIfTI qform are ignored) and refuses an empty label, where MONAI Label
    would write a SEG in the label file's own geometry or return ``""``.

    Raises:
        SourceError: 422 when the label is unreadable, does not cover the image's grid or is empty.
    """
    import SimpleITK as sitk
    from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    reference = read_sitk(image_nifti)
    try:
        label = read_sitk(label_file)
    except RuntimeError:
        raise SourceError(422, f"label {Path(label_file).name}: not a readable image") from None
    if label.GetSize() != reference.GetSize():
        raise SourceError(422, f"label size {label.GetSize()} does not match the image's {reference.GetSize()}")
    label.CopyInformation(reference)
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v != 0]
    if not values:
        raise SourceError(422, "label is empty: nothing to save as DICOM SEG")
    by_value = {v: n for n, v in names.items()}
    info = []
    for i, v in enumerate(values):  # nifti_to_dicom_seg pairs label_info[i] with the i-th non-zero value
        name = by_value.get(v, f"label_{v}")
        info.append({"name": name, "description": name, "model_name": "SemiSAM-O1",
                     "color": GENERIC_ANATOMY_COLORS.get(name, PALETTE[i % len(PALETTE)])})
    with tempfile.TemporaryDirectory() as tmp:
        on_grid = Path(tmp) / "label.nii.gz"
        sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt16), str(on_grid), True)
        written = Path(nifti_to_dicom_seg(str(series_dir), str(on_grid), info, file_ext="*.dcm", use_itk=False))
    shutil.move(str(written), str(out))
    return Path(out)


class _Ttl:
    """One value reused for ``ttl`` seconds (thread-safe enough for listings)."""

    def __init__(self, ttl: float):
        self.ttl, self._at, self._value = ttl, -1e9, None

    def get(self, compute: Callable[[], Any]):
        if time.monotonic() - self._at > self.ttl:
            self._value, self._at = compute(), time.monotonic()
        return self._value

    def clear(self):
        self._at = -1e9


class DICOMwebSource(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with pydicom-seg instead of dcmqi and errors as HTTP answers.

    Args:
        client: DICOMweb client of the server.
        search_filter: QIDO filter of the image series listed (e.g. ``{"Modality": "MR"}``).
        cache_path: the cache folder (:func:`cache_root`).
        label_names: the app's label map, for naming DICOM SEG segments.
    """

    def __init__(self, client, search_filter: dict, cache_path: Path, label_names: Callable[[], dict[str, int]] = dict):
        self._root = Path(cache_path)
        self._label_names = label_names
        self._series = _Ttl(LISTING_TTL)
        self._segs = _Ttl(LISTING_TTL)
        self._lock = threading.RLock()  # downloads and conversions: one at a time
        super().__init__(client, search_filter, cache_path=str(self._root.parent), fetch_by_frame=False, convert_to_nifti=True)

    @property
    def url(self) -> str:
        return self._client.base_url

    def _images(self) -> Path:
        return Path(self._datastore.image_path())

    # ---- listing -------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        def search():
            with source_errors(self.url, "listing series"):
                found = self._client.search_for_series(search_filters=self._search_filter)
            return [str(Dataset.from_json(ds)["SeriesInstanceUID"].value) for ds in found]

        return self._series.get(search)

    def _final_segs(self) -> dict[str, str]:
        """``{image series UID: SEG series UID}`` of the listed images (the newest SEG wins)."""

        def search():
            with source_errors(self.url, "listing DICOM SEG series"):
                segs = self._client.search_for_series(search_filters={"Modality": "SEG"})
                images = set(self.list_images())
                found: dict[str, tuple[str, str]] = {}
                for seg in segs:
                    study, series = seg[STUDY_UID]["Value"][0], seg[SERIES_UID]["Value"][0]
                    meta = Dataset.from_json(self._client.retrieve_series_metadata(study, series)[0])
                    refs = meta.get("ReferencedSeriesSequence")
                    image = str(refs[0].SeriesInstanceUID) if refs else ""
                    stamp = f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}{meta.get('ContentDate', '')}{meta.get('ContentTime', '')}"
                    if image in images and (image not in found or stamp >= found[image][1]):
                        found[image] = (series, stamp)
            logger.info(f"DICOM SEG labels: {len(found)} of {len(segs)} SEG series reference one of the {len(images)} image series listed ({self._search_filter})")
            return {image: seg for image, (seg, _) in found.items()}

        return self._segs.get(search)

    def get_labeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        if label_tag not in (None, DefaultLabelTag.FINAL):
            return super(DICOMWebDatastore, self).get_labeled_images(label_tag, labels)
        return sorted(self._final_segs())

    def get_unlabeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        labelled = set(self._final_segs())
        return sorted(set(self.list_images()) - labelled)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        if tag != DefaultLabelTag.FINAL:
            return super().get_label_by_image_id(image_id, tag)
        return self._final_segs().get(image_id, "")

    def refresh(self):
        self._series.clear()
        self._segs.clear()

    # ---- files ---------------------------------------------------------------------------------
    def _download(self, series_uid: str, dest: Path) -> None:
        """All instances of one series into ``dest`` (written to a temporary folder, then renamed)."""
        with source_errors(self.url, f"looking up series {series_uid}"):
            found = [s for s in self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
                     if s.get(SERIES_UID, {}).get("Value") == [series_uid]]
            if not found:
                studies = self._client.search_for_studies(search_filters={"StudyInstanceUID": series_uid})
                hint = " (that is a study UID: give the UID of one of its series)" if studies else ""
                raise SourceError(404, f"series {series_uid} not found on DICOMweb server {self.url}{hint}")
        study = found[0][STUDY_UID]["Value"][0]
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        try:
            with source_errors(self.url, f"downloading series {series_uid}"):
                for instance in self._client.retrieve_series(study, series_uid):
                    instance.save_as(str(tmp / f"{instance.SOPInstanceUID}.dcm"))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def series_dir(self, series_uid: str) -> Path:
        """The downloaded instances of a series (downloaded on first use)."""
        dest = self._images() / series_uid
        with self._lock:
            if not dest.is_dir() or not any(dest.iterdir()):
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download(series_uid, dest)
        return dest

    def get_image_uri(self, image_id: str) -> str:
        """``<cache>/<series>.nii.gz``, downloaded and converted on first use, registered in the local index."""
        nifti = self._images() / f"{image_id}.nii.gz"
        if nifti.exists() and image_id in self._datastore.objects:
            return str(nifti)
        with self._lock:
            if not (nifti.exists() and image_id in self._datastore.objects):
                tmp = series_to_nifti(self.series_dir(image_id), self._root / ".semisam-tmp" / f"{image_id}.nii.gz", image_id)
                # copies into the cache folder and indexes it (labels of other tags are saved against it)
                super(DICOMWebDatastore, self).add_image(image_id, str(tmp), {"SeriesInstanceUID": image_id})
                tmp.unlink()
        return str(nifti)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return super(DICOMWebDatastore, self).get_label_uri(label_id, label_tag)
        out = self._root / "seg" / f"{label_id}.nii.gz"
        if out.exists():
            return str(out)
        with self._lock:
            if out.exists():
                return str(out)
            image_id = image_id or next((i for i, s in self._final_segs().items() if s == label_id), "")
            if not image_id:
                raise SourceError(404, f"DICOM SEG series {label_id} is not the label of any listed image series")
            image = Path(self.get_image_uri(image_id))
            seg_dir = self._root / "seg" / label_id
            if not seg_dir.is_dir() or not any(seg_dir.iterdir()):
                seg_dir.parent.mkdir(parents=True, exist_ok=True)
                self._download(label_id, seg_dir)
            return str(seg_to_label(next(seg_dir.glob("*.dcm")), image, out))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = "") -> str:
        """Non-final tags stay in the local cache (as in MONAI Label); ``final`` also goes to the server as DICOM SEG."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        from monailabel.datastore.utils.convert import binary_to_image

        image = Path(self.get_image_uri(image_id))
        converted = binary_to_image(str(image), label_filename) if str(label_filename).endswith(".bin") else ""
        label_file = converted or label_filename
        with tempfile.TemporaryDirectory() as tmp:
            seg = label_to_seg(label_file, image, self.series_dir(image_id), self._label_names(), Path(tmp) / "seg.dcm")
            import pydicom

            dataset = pydicom.dcmread(str(seg))
            with source_errors(self.url, f"storing the DICOM SEG of series {image_id}"):
                self._client.store_instances([dataset])
        seg_uid = str(dataset.SeriesInstanceUID)
        logger.info(f"Stored DICOM SEG {seg_uid} for series {image_id} on {self.url}")
        self._segs.clear()
        info = {**label_info, "SeriesInstanceUID": seg_uid}
        info.pop("label_info", None)
        saved = super(DICOMWebDatastore, self).save_label(image_id, label_file, label_tag, info)
        if converted:
            os.unlink(converted)
        return saved


class SafeDICOMwebSource(NameChecks, DICOMwebSource):
    """:class:`DICOMwebSource` whose ids must be DICOM UIDs and whose tags and file names must be safe names."""

    check_id = staticmethod(dicom_uid)


def dicomweb_datastore(url: str, label_names: Callable[[], dict[str, int]] = dict) -> SafeDICOMwebSource:
    """The datastore for ``--studies http(s)://...``; never downloads dcmqi (MONAI Label's default does).

    Credentials: ``MONAI_LABEL_DICOMWEB_USERNAME``/``PASSWORD`` (HTTP basic, as MONAI Label's proxy
    for OHIF uses them). Series listed: ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` (``serve`` sets it to
    the app's modality unless the environment has it).
    """
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.config import settings

    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    return SafeDICOMwebSource(client, dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER), cache_root(url), label_names)
