"""Reading images and labels with their geometry, and refusing bad input with a message naming the file: an
unreadable or malformed file, or an image too large for this machine (:func:`check_image_file` against its memory,
:func:`check_memory` against what is free before each heavy step).

Arrays stay in the file's own voxel order (nibabel's ``(i, j, k)`` = ``(D, H, W)`` here): nothing is
reoriented, so a label written with :func:`save_label` has exactly the image's affine and header.
The package's own caches (``.npy``/``.npz``) are read through :func:`load_array`/:func:`load_arrays`,
which many threads may call at once.
"""

from __future__ import annotations

import glob
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """Bad input (unreadable file, wrong shape or geometry, bad label values); the message names the file."""


class TooLargeError(InputError):
    """An image larger than this server can ever process (HTTP 413)."""


#: bytes per voxel the heaviest per-image step holds (stage one: the image, its label and confidence, the vote
#: state of the searched box; see :meth:`~semisam_o1.stage_one.predictor.StageOne.predict`'s memory check)
PROCESS_BYTES_PER_VOXEL = 4 + 1 + 4 + 4 * 4


@dataclass
class Volume:
    """A 3D image: ``array`` (D, H, W) float32 in the file's voxel order, ``affine`` (4, 4) voxel -> mm."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along D, H, W."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force a full read: a truncated file fails here, not later
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    return img


def _squeeze3d(path: Path, array: np.ndarray) -> np.ndarray:
    array = array.reshape(array.shape[:3] + tuple(s for s in array.shape[3:] if s != 1))
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return array


def load_image(path: Path | str) -> Volume:
    """Read a 3D image.

    Raises:
        InputError: unreadable, not 3D, containing NaN/inf, or constant (no contrast to segment).
    """
    path = Path(path)
    img = _load(path)
    array = _squeeze3d(path, img.get_fdata(dtype=np.float32))
    if not np.isfinite(array).all():
        raise InputError(f"{path}: image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputError(f"{path}: image is constant ({array.min()}), nothing to segment")
    return Volume(path=path, array=array, affine=img.affine, header=img.header)


def check_image_file(path: Path | str, name: str, memory_bytes: int | None = None) -> Volume:
    """The one check of an image a client uploads (a datastore image, an infer input, a session's image),
    before anything keeps it: the image as :func:`load_image` reads it.

    In this order, so that no bad header makes the server read or allocate much: a readable NIfTI header; 3D, or
    4D with one channel; a size the server can process (:data:`PROCESS_BYTES_PER_VOXEL` x voxels within
    ``memory_bytes``, default this machine's physical memory); a finite, invertible affine (voxel -> mm); then the
    voxels: readable in full, finite, not constant.

    Args:
        name: how messages name the upload, e.g. ``"image 'case_7'"`` (never the server's temporary path).
    Raises:
        TooLargeError: the image has more voxels than the server can process (the message names size and limit).
        InputError: any other reason, naming ``name``.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
    except Exception as e:
        raise InputError(f"{name}: not a readable NIfTI image ({type(e).__name__})") from None
    if len(shape) < 3 or any(n != 1 for n in shape[3:]) or min(shape[:3]) < 1:
        raise InputError(f"{name}: expected a 3D volume (or 4D with one channel), got shape {shape}")
    if memory_bytes is None:
        import psutil

        memory_bytes = psutil.virtual_memory().total
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels * PROCESS_BYTES_PER_VOXEL > memory_bytes:
        raise TooLargeError(f"{name}: {'x'.join(map(str, shape[:3]))} voxels ({voxels / 1e6:.0f} M) need about "
                            f"{voxels * PROCESS_BYTES_PER_VOXEL / 2**30:.1f} GiB to process, more than this server's "
                            f"{memory_bytes / 2**30:.1f} GiB; crop or downsample the scan")
    affine = np.asarray(img.affine, np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{name}: its affine (voxel -> mm) is not finite and invertible: the scanner geometry is missing")
    try:
        return load_image(path)
    except InputError as e:
        raise InputError(str(e).replace(str(path), name)) from None


def check_memory(what: str, shape: Iterable[int], bytes_per_voxel: float, fixed_bytes: int = 0) -> None:
    """Refuse work whose estimate (``bytes_per_voxel`` x voxels + ``fixed_bytes``) exceeds the memory
    available now, with an :class:`InputError` naming ``what`` and its size (an HTTP 422 on the server)
    instead of the kernel killing the server. :func:`check_image_file` refuses, once, what no amount of
    free memory would fit; this is asked before each heavy step, against what is free at that moment."""
    import psutil

    shape = [int(n) for n in shape]
    need = bytes_per_voxel * float(np.prod(shape)) + fixed_bytes
    available = psutil.virtual_memory().available
    if need > available:
        raise InputError(
            f"{what}: {'x'.join(map(str, shape))} voxels ({np.prod(shape) / 1e6:.0f} M) needs about {need / 2**30:.1f} GiB, "
            f"more than the {available / 2**30:.1f} GiB available; free memory or crop/downsample the scan"
        )


def read_geometry(path: Path | str) -> Volume:
    """The grid of a file (shape, affine, header) as a :class:`Volume` whose array is all zeros.

    For checking a label against another label (e.g. prediction vs ground truth) without an image.
    """
    path = Path(path)
    img = _load(path)
    return Volume(path=path, array=np.zeros(img.shape[:3], np.float32), affine=img.affine, header=img.header)


def load_map(path: Path | str) -> np.ndarray:
    """A float map written by :func:`save_label` (e.g. entropy) as ``(D, H, W)`` float32."""
    return _squeeze3d(Path(path), _load(Path(path)).get_fdata(dtype=np.float32))


def label_array(path: Path | str) -> np.ndarray:
    """A label file's values as stored, without checking them against an image (NIfTI or any format
    SimpleITK reads, e.g. 3D Slicer's ``.nrrd``); for summaries such as the values present.

    Raises:
        InputError: the file cannot be read.
    """
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        return np.asanyarray(_load(path).dataobj)
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(read_sitk(path))
    except RuntimeError as e:
        raise InputError(f"{path}: not a readable label image ({str(e).strip().splitlines()[-1]})") from None


def load_label(path: Path | str, image: Volume, allowed: set[int] | None = None, require_foreground: bool = True) -> np.ndarray:
    """Read a label map that belongs to ``image``; returns (D, H, W) int64.

    NIfTI files must have the image's shape and affine. Other formats that SimpleITK reads (3D
    Slicer's ``.nrrd``/``.seg.nrrd``, ``.mha``) must have the image's size, spacing, origin and
    direction as SimpleITK reads both; the array comes back in the image's (D, H, W) voxel order.

    Raises:
        InputError: unreadable, shape or geometry not the image's, non-integer values, values outside
            ``allowed`` (background 0 is always allowed), or empty when ``require_foreground``.
    """
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        img = _load(path)
        data = _squeeze3d(path, np.asanyarray(img.dataobj))
        if data.shape != image.array.shape:
            raise InputError(f"{path}: label shape {data.shape} does not match image {image.path.name} shape {image.array.shape}")
        if not np.allclose(img.affine, image.affine, atol=1e-3):
            raise InputError(f"{path}: label geometry (affine) does not match image {image.path.name}")
    else:
        data = _load_itk_label(path, image)
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise InputError(f"{path}: label has non-integer values")
    label = data.astype(np.int64)
    values = set(np.unique(label).tolist()) - {0}
    if allowed is not None and values - set(allowed):
        raise InputError(f"{path}: label values {sorted(values - set(allowed))} are not in the label map {sorted(allowed)}")
    if require_foreground and not values:
        raise InputError(f"{path}: label is empty (background only)")
    return label


def _load_itk_label(path: Path, image: Volume) -> np.ndarray:
    """A non-NIfTI label checked against the image's physical grid; (D, H, W) in the image's voxel order."""

    try:
        label = read_sitk(path)
    except RuntimeError as e:
        raise InputError(f"{path}: not a readable label image ({str(e).strip().splitlines()[-1]})") from None
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise InputError(f"{path}: expected a single-component 3D label, got {label.GetDimension()}D x {label.GetNumberOfComponentsPerPixel()}")
    ref = read_sitk(image.path)
    checks = [
        ("size", label.GetSize(), ref.GetSize(), 0),
        ("spacing", label.GetSpacing(), ref.GetSpacing(), 1e-3),
        ("origin", label.GetOrigin(), ref.GetOrigin(), 1e-2),
        ("direction", label.GetDirection(), ref.GetDirection(), 1e-4),
    ]
    for name, got, want, tol in checks:
        if not np.allclose(got, want, atol=tol):
            raise InputError(f"{path}: label {name} {tuple(round(v, 4) for v in got)} does not match image {image.path.name} {tuple(round(v, 4) for v in want)}")
    return sitk_to_dhw(label)


#: The ImageIO SimpleITK reads each file suffix with. Named explicitly so ITK never probes a file with its
#: other readers: its HDF5 reader opens every candidate with the HDF5 library, which is not thread-safe
#: (a threaded server hit HDF5 "no VOL object wrap context" errors and a segfault).
_ITK_READERS = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
                ".seg.nrrd": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}


def read_sitk(path: Path | str, pixel_type=None):
    """``SimpleITK.ReadImage(path)`` (optionally cast to ``pixel_type``, e.g. ``sitk.sitkFloat32``) with the
    reader chosen by the file suffix (NIfTI, NRRD, MetaImage); other suffixes fall back to ITK's probing."""
    import SimpleITK as sitk

    return sitk.ReadImage(str(path), sitk.sitkUnknown if pixel_type is None else pixel_type, imageIO=_itk_reader(path))


def _itk_reader(path: Path | str) -> str:
    name = Path(path).name.lower()
    return next((v for k, v in sorted(_ITK_READERS.items(), key=lambda kv: -len(kv[0])) if name.endswith(k)), "")


def read_sitk_grid(path: Path | str):
    """The grid of an image file without its voxels: a ``SimpleITK.ImageFileReader`` after
    ``ReadImageInformation()``, which answers ``GetSize()``, ``GetOrigin()``, ``GetSpacing()`` and
    ``GetDirection()`` like the image would (reader chosen by suffix as in :func:`read_sitk`)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_itk_reader(path))
    reader.ReadImageInformation()
    return reader


def sitk_to_dhw(image, view: bool = False) -> np.ndarray:
    """The voxels of SimpleITK ``image`` in this package's (D, H, W) order, the (x, y, z) index order in which
    nibabel reads NIfTI (``SimpleITK.GetArrayFromImage`` gives (z, y, x)); a vector image keeps its
    components last, (D, H, W, C). A transposed view of a new array, so ``image`` may be freed afterwards;
    ``view=True``: of ``image``'s own buffer (no copy, read-only), valid only while ``image`` lives.

    Example: an image of ``GetSize() == (4, 3, 2)`` gives shape ``(4, 3, 2)``, and ``[i, j, k]`` is
    ``image.GetPixel(i, j, k)``.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image) if view else sitk.GetArrayFromImage(image)
    return array.transpose(2, 1, 0, *range(3, array.ndim))


def dhw_to_sitk(array: np.ndarray):
    """A scalar SimpleITK image of ``array`` (D, H, W), the inverse of :func:`sitk_to_dhw`; its origin,
    spacing and direction are SimpleITK's defaults until set (``CopyInformation``)."""
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))


def sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes: MONAI Label's ``file_checksum`` without its ``"SHA256:"`` prefix
    (the bare digest is what cache ids, checkpoints and the sample data's manifest store)."""
    from monailabel.utils.others.generic import file_checksum  # (heavy import: only when hashing)

    return file_checksum(str(path), "SHA256").split(":", 1)[1]


#: numpy parses each ``.npy`` header (every ``.npz`` member's too) with ``ast.literal_eval``, and
#: CPython 3.11 keeps the AST builder's recursion counter per interpreter, not per thread: two threads
#: parsing at once (a garbage collection inside one parse can switch threads) fail with
#: ``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905). The server reads
#: caches from many request threads, so every array read of this package holds this lock.
_NUMPY_HEADER_LOCK = threading.Lock()


def load_array(path: Path | str, mmap: bool = True) -> np.ndarray:
    """The array of an ``.npy`` file: read-only memory map (``mmap=True``, only the header is read now)
    or in memory; safe to call from many threads at once (see ``_NUMPY_HEADER_LOCK``)."""
    with _NUMPY_HEADER_LOCK:
        return np.load(str(path), mmap_mode="r" if mmap else None)


def save_array(path: Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically (:func:`atomic_write`; memory-mapped later with :func:`load_array`)."""
    return atomic_write(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array)))


def load_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Every member of an ``.npz`` file, in memory, by name; safe to call from many threads at once."""
    with _NUMPY_HEADER_LOCK, np.load(str(path)) as data:
        return {name: data[name] for name in data.files}


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename into ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix  # writers pick format by it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_interrupted_writes(path: Path) -> list[Path]:
    """Delete the temporary files an :func:`atomic_write` of ``path`` left when its process was killed
    (``.<name>.*`` beside it). Call it only while holding the lock that makes the caller ``path``'s one writer."""
    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.*")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_label(label: np.ndarray, image: Volume, path: Path | str, dtype=np.uint8) -> Path:
    """Write ``label`` (D, H, W) as ``dtype`` with the image's exact geometry; format by extension.

    Also used for float maps (uncertainty) with ``dtype=np.float32``.

    NIfTI (``.nii``, ``.nii.gz``) keeps the image's affine, qform and sform; anything else (``.nrrd``,
    ``.mha``, as 3D Slicer asks with ``result_extension``) is written by SimpleITK with the origin,
    spacing and direction of the image as SimpleITK reads it.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        import SimpleITK as sitk

        out = dhw_to_sitk(label.astype(dtype))
        out.CopyInformation(read_sitk(image.path))
        return atomic_write(path, lambda tmp: sitk.WriteImage(out, str(tmp), True))
    header = image.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(label.astype(dtype), image.affine, header)
    out.set_qform(image.header.get_qform(), code=int(image.header["qform_code"]))
    out.set_sform(image.header.get_sform(), code=int(image.header["sform_code"]))
    return atomic_write(path, lambda tmp: nib.save(out, str(tmp)))


def class_volumes(label: np.ndarray, image: Volume, names: dict[str, int]) -> dict[str, dict]:
    """``{name: {"value", "voxels", "volume_mm3"}}`` of a label map (D, H, W) on ``image``'s grid."""
    voxel_mm3 = float(np.prod(image.spacing))
    out = {}
    for name, value in names.items():
        n = int((label == value).sum())
        out[name] = {"value": value, "voxels": n, "volume_mm3": round(n * voxel_mm3, 2)}
    return out
