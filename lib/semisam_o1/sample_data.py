"""Fill ``sample-datastore/`` with real MSD Task04 hippocampus MRI, verified against its manifest.

The image files are never committed (CC-BY-SA 4.0 data from the Medical Segmentation Decathlon);
only ``sample-datastore/manifest.json`` is. :func:`populate` copies the manifest's cases from a local
copy of the data (``../shared/data/hippocampus`` on the team's machines) or, when there is none,
downloads the official ``Task04_Hippocampus.tar`` with MONAI's md5-checked download helper.

Layout written (a MONAI Label ``LocalDatastore``)::

    sample-datastore/
        manifest.json                 committed: case ids, sha256 per file, source, licence
        hippocampus_001.nii.gz ...    the 20 images
        labels/final/<template>.nii.gz   the one template label (the app's only real label)
        truth/<case>.nii.gz           ground truth of the 19 pool images, for evaluation only
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from semisam_o1 import PROJECT_ROOT
from semisam_o1.volumes import sha256

SAMPLE_DATASTORE = PROJECT_ROOT / "sample-datastore"
MANIFEST = SAMPLE_DATASTORE / "manifest.json"
TRUTH_DIR = "truth"
MSD_TASK = "Task04_Hippocampus"


class SampleDataError(RuntimeError):
    """Raised when a sample file is missing or does not match its manifest checksum."""


@dataclass(frozen=True)
class SourceDir:
    """A folder with ``images/<id>.nii.gz`` and ``labels/<id>.nii.gz`` (MSD's imagesTr/labelsTr renamed)."""

    images: Path
    labels: Path


def load_manifest(path: Path = MANIFEST) -> dict:
    """Read the committed manifest (case ids, template id, label map, sha256 of every file)."""
    with open(path) as f:
        return json.load(f)


def find_local_source(project_root: Path = PROJECT_ROOT) -> SourceDir | None:
    """The team's read-only copy of MSD Task04 beside the checkout, or ``$SEMISAM_SAMPLE_SOURCE``."""
    candidates = [os.environ.get("SEMISAM_SAMPLE_SOURCE"), project_root.parent / "shared" / "data" / "hippocampus"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir() and (Path(candidate) / "labels").is_dir():
            return SourceDir(Path(candidate) / "images", Path(candidate) / "labels")
    return None


def msd_url() -> str:
    """Where the tar is downloaded from: ``$SEMISAM_SAMPLE_URL`` (a mirror), else MONAI's ``DecathlonDataset`` URL."""
    from monai.apps import DecathlonDataset

    return os.environ.get("SEMISAM_SAMPLE_URL") or DecathlonDataset.resource[MSD_TASK]


def download_msd(cache_dir: Path) -> SourceDir:
    """Download and extract the official ``Task04_Hippocampus.tar`` (md5-checked by MONAI).

    Uses the URL (unless ``$SEMISAM_SAMPLE_URL`` names a mirror, see :func:`msd_url`) and md5 that
    MONAI's own ``DecathlonDataset`` uses, so both stay in step.

    Raises:
        SampleDataError: one line saying the download failed, from which URL, and how to provide
            the data instead (a local copy, or the tar downloaded by hand into ``cache_dir``).
    """
    from monai.apps import DecathlonDataset, download_and_extract

    cache_dir.mkdir(parents=True, exist_ok=True)
    task_dir = cache_dir / MSD_TASK
    if not (task_dir / "imagesTr").is_dir():
        url = msd_url()
        try:
            download_and_extract(
                url=url,
                filepath=cache_dir / f"{MSD_TASK}.tar",
                output_dir=cache_dir,
                hash_val=DecathlonDataset.md5[MSD_TASK],
                hash_type="md5",
                progress=sys.stderr.isatty(),
            )
        except Exception as e:
            root = e
            while (root.__cause__ or root.__context__) is not None:  # the innermost reason, e.g. ConnectionRefusedError
                root = root.__cause__ or root.__context__
            cause = " ".join(f"{type(root).__name__}: {root}".split())[:160]
            local = PROJECT_ROOT.parent / "shared" / "data" / "hippocampus"
            raise SampleDataError(
                f"the sample data could not be downloaded from {url} ({cause}); provide it instead: "
                f"a copy of MSD {MSD_TASK} with images/ and labels/ at {local} (or $SEMISAM_SAMPLE_SOURCE), "
                f"or download that URL by hand to {cache_dir / f'{MSD_TASK}.tar'}, or set $SEMISAM_SAMPLE_URL to a mirror"
            ) from None
    return SourceDir(task_dir / "imagesTr", task_dir / "labelsTr")


def _planned_files(manifest: dict, datastore: Path) -> list[tuple[str, Path, str]]:
    """(source relative name, destination, expected sha256) for every file the manifest lists."""
    template = manifest["template"]
    plan = []
    for case in manifest["cases"]:
        cid = case["id"]
        plan.append((f"images/{cid}.nii.gz", datastore / f"{cid}.nii.gz", case["image_sha256"]))
        label_dir = datastore / "labels" / "final" if cid == template else datastore / TRUTH_DIR
        plan.append((f"labels/{cid}.nii.gz", label_dir / f"{cid}.nii.gz", case["label_sha256"]))
    return plan


def verify(datastore: Path = SAMPLE_DATASTORE, manifest: dict | None = None) -> list[str]:
    """Problems with the datastore's files, each naming the file; empty when all match the manifest."""
    manifest = manifest or load_manifest(datastore / "manifest.json")
    problems = []
    for _, dst, expected in _planned_files(manifest, datastore):
        if not dst.exists():
            problems.append(f"{dst}: missing")
        elif sha256(dst) != expected:
            problems.append(f"{dst}: sha256 {sha256(dst)} does not match the manifest ({expected})")
    return problems


def populate(
    datastore: Path = SAMPLE_DATASTORE,
    source: SourceDir | None = None,
    download_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Fill ``datastore`` from ``source`` (default: the local copy, else the official download).

    Idempotent: files already present with the right sha256 are left untouched; a present file with a
    wrong checksum is replaced from the source (it is sample data, never a clinician's label). Every
    copied file is checked before it is moved into place (atomic rename).

    Returns:
        ``{"copied": n, "kept": n, "source": str}``.

    Raises:
        SampleDataError: a source file is missing or its checksum differs from the manifest, or
            there is no local copy and the download failed.
    """
    if not (datastore / "manifest.json").exists():  # a new folder becomes a copy of the sample datastore
        datastore.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MANIFEST, datastore / "manifest.json")
    manifest = load_manifest(datastore / "manifest.json")
    if source is None:
        source = find_local_source()
    if source is None:
        source = download_msd(download_dir or Path(tempfile.gettempdir()) / "semisam_o1_msd")
    copied = kept = 0
    plan = _planned_files(manifest, datastore)
    for rel, dst, expected in tqdm(plan, desc="sample data", unit="file", disable=not progress):
        if dst.exists() and sha256(dst) == expected:
            kept += 1
            continue
        kind, name = rel.split("/")
        src = (source.images if kind == "images" else source.labels) / name
        if not src.exists():
            raise SampleDataError(f"{src}: missing from the sample data source")
        if sha256(src) != expected:
            raise SampleDataError(f"{src}: sha256 {sha256(src)} does not match the manifest ({expected})")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        copied += 1
    return {"copied": copied, "kept": kept, "source": str(source.images.parent)}
