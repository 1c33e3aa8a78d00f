"""Template-to-target registration for label propagation: a deterministic affine and a dense voxel map.

Conventions
-----------
- ``fixed`` is the target (the volume being labelled), ``moving`` is the template. Both are
  ``SimpleITK.Image`` as read by ``SimpleITK.ReadImage`` (physical units: mm, LPS).
- The returned transform maps a *fixed* physical point (mm) to the corresponding *moving* physical
  point (mm) -- the ITK convention, so ``sitk.Resample(moving_label, fixed, T, ...)`` warps the
  template label onto the target.
- Arrays are in **nibabel order** ``(D, H, W)`` = nibabel array axes 0, 1, 2 = SimpleITK index
  ``(x, y, z)``. (``sitk.GetArrayFromImage`` returns the transposed ``(z, y, x)`` order;
  :func:`~semisam_o1.volumes.sitk_to_dhw` transposes it back, so callers never see it.) Both libraries keep the file's voxel order, so
  nibabel ``arr[i, j, k]`` is SimpleITK index ``(i, j, k)``.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from semisam_o1 import choices
from semisam_o1.volumes import (
    InputError,
    atomic_write,
    load_arrays,
    read_sitk,
    remove_interrupted_writes,
    sha256,
    sitk_to_dhw,
)

__all__ = ["affine_register", "demons_register", "syn_register", "deterministic_ants", "map_voxels", "shrink", "warp_label", "read_image",
           "save_transform", "load_transform", "RegistrationCache", "RegistrationError"]


@contextmanager
def _single_thread():
    """ITK's metric threads split the random samples non-deterministically: run on one thread."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


@contextmanager
def deterministic_ants(seed: int = 1):
    """Run ``antspyx`` calls inside this block reproducibly: ``ANTS_RANDOM_SEED`` = ``seed`` (the affine
    metric's random sampling) and one ITK thread (ANTs' ITK splits the metric's random samples across
    threads non-deterministically: SyN fields of the same pair differ by up to ~1 mm run to run on 2
    threads; on 1 thread they are identical). Both variables are restored on exit.

    That ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when first used, so every ANTs call of
    a process must run inside this block for the guarantee to hold (:func:`syn_register` and the
    benchmarks' ANTs peer do). SimpleITK reads the same variable once too: it settles its own thread
    count (the user's value) before the variable is changed.

    Example::

        with deterministic_ants(seed=1):
            reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN")
    """
    sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()  # SimpleITK settles its own thread count first
    names = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED")
    old = {name: os.environ.get(name) for name in names}
    os.environ.update({names[0]: "1", names[1]: str(int(seed))})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_image(path: str) -> sitk.Image:
    """A volume as a float32 ``SimpleITK.Image`` (the pixel type registration expects)."""
    return read_sitk(path, sitk.sitkFloat32)


#: Transform kinds :func:`save_transform` stores by their parameters (the displacement field as an array).
_PARAMETRIC = {"AffineTransform": sitk.AffineTransform, "BSplineTransform": sitk.BSplineTransform,
               "IdentityTransform": lambda dim: sitk.Transform(dim, sitk.sitkIdentity),
               "TranslationTransform": sitk.TranslationTransform, "Euler3DTransform": lambda dim: sitk.Euler3DTransform()}


def _flatten(transform: sitk.Transform) -> list[sitk.Transform]:
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        return [t for i in range(composite.GetNumberOfTransforms()) for t in _flatten(composite.GetNthTransform(i))]
    return [transform]


def save_transform(transform: sitk.Transform, path: Path) -> Path:
    """Write a registration result to ``path`` (``.npz``), atomically.

    Stored as plain arrays, not ITK transform files: ITK reads and writes those (and probes every file it
    reads) with its HDF5 library, which is not thread-safe. A composite is stored as its flattened list
    (ITK order: the last transform is applied first); each part as its ITK class name and parameters, a
    displacement field as a float32 ``(z, y, x, 3)`` array (mm) with its grid. Supported parts: affine,
    B-spline, identity, translation, Euler 3D and displacement field.
    """
    arrays: dict[str, np.ndarray] = {}
    parts = _flatten(transform)
    for i, t in enumerate(parts):
        name = t.GetName()
        arrays[f"{i}_name"] = np.array(name)
        if name == "DisplacementFieldTransform":
            field = sitk.DisplacementFieldTransform(t).GetDisplacementField()
            arrays[f"{i}_field"] = sitk.GetArrayViewFromImage(field).astype(np.float32)
            arrays[f"{i}_grid"] = np.array([*field.GetOrigin(), *field.GetSpacing(), *field.GetDirection()])
        elif name in _PARAMETRIC:
            arrays[f"{i}_fixed"] = np.array(t.GetFixedParameters(), dtype=np.float64)
            arrays[f"{i}_params"] = np.array(t.GetParameters(), dtype=np.float64)
        else:
            raise ValueError(f"cannot store a {name}")
    arrays["count"] = np.array(len(parts))
    return atomic_write(Path(path), lambda tmp: np.savez(tmp, **arrays))


def load_transform(path: Path) -> sitk.Transform:
    """The transform :func:`save_transform` wrote (one part as itself, several as a composite)."""
    data = load_arrays(path)
    parts = []
    for i in range(int(data["count"])):
        name = str(data[f"{i}_name"])
        if name == "DisplacementFieldTransform":
            field = sitk.GetImageFromArray(data[f"{i}_field"].astype(np.float64), isVector=True)
            grid = data[f"{i}_grid"]
            field.SetOrigin(tuple(grid[:3]))
            field.SetSpacing(tuple(grid[3:6]))
            field.SetDirection(tuple(grid[6:]))
            parts.append(sitk.DisplacementFieldTransform(field))
        else:
            t = _PARAMETRIC[name](3)
            t.SetFixedParameters(tuple(data[f"{i}_fixed"]))
            t.SetParameters(tuple(data[f"{i}_params"]))
            parts.append(t)
    if len(parts) == 1:
        return parts[0]
    out = sitk.CompositeTransform(3)
    for t in parts:
        out.AddTransform(t)
    return out


def affine_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    seed: int = 0,
    iterations: int = 200,
    sampling: float = 0.25,
) -> sitk.Transform:
    """Affine registration of ``moving`` (template) to ``fixed`` (target), Mattes mutual information.

    Two-level pyramid (shrink 2, 1; smoothing 1, 0 voxel), regular-step gradient descent, geometric
    centre initialisation. Random metric sampling uses ``seed`` and the registration runs on one
    thread, so the result is reproducible bit-for-bit. About 0.5-1 s on a ~35x50x35 volume.

    Args:
        fixed: target image (float32).
        moving: template image (float32).
        seed: seed of the random metric sampling.
        iterations: gradient-descent iterations per pyramid level.
        sampling: fraction of voxels sampled by the metric.

    Returns:
        ``sitk.Transform`` mapping fixed physical points (mm) to moving physical points (mm).
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed + 1)  # SimpleITK seed 0 = wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, iterations)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    reg.SetNumberOfThreads(1)
    with _single_thread():
        out = reg.Execute(fixed, moving)
    # Execute returns a CompositeTransform wrapping the optimised affine; flatten when possible.
    if isinstance(out, sitk.CompositeTransform) and out.GetNumberOfTransforms() == 1:
        return out.GetNthTransform(0)
    return out


@contextmanager
def _ants_pair(fixed: sitk.Image, moving: sitk.Image, seed: int):
    """``(ants, fixed, moving, folder)``: the pair as ANTs images (via float32 files in a temporary folder, removed
    afterwards, where ANTs' own transform files go too), inside :func:`deterministic_ants`."""
    with deterministic_ants(seed), tempfile.TemporaryDirectory(prefix="semisam-ants-") as tmp:
        import ants

        tmp = Path(tmp)
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(tmp / "fixed.nii.gz"))
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(tmp / "moving.nii.gz"))
        yield ants, ants.image_read(str(tmp / "fixed.nii.gz")), ants.image_read(str(tmp / "moving.nii.gz")), tmp


def ants_affine_register(fixed: sitk.Image, moving: sitk.Image, seed: int = 1) -> sitk.AffineTransform:
    """Affine registration of ``moving`` (template) to ``fixed`` (target) by ANTs (``antspyx``:
    ``ants.registration(type_of_transform="Affine")``: mutual information, its own multi-resolution schedule),
    seeded and on one thread (:func:`deterministic_ants`), so a pair gives the same transform in every process.

    Returns:
        ``sitk.AffineTransform`` mapping fixed physical points (mm) to moving physical points (mm).
    """
    with _ants_pair(fixed, moving, seed) as (ants, f, m, tmp):
        reg = ants.registration(fixed=f, moving=m, type_of_transform="Affine", outprefix=str(tmp / "affine_"))
        read = sitk.ReadTransform(reg["fwdtransforms"][0])  # ITK's MatrixOffsetTransformBase: 9 matrix + 3 translation, centre
    out = sitk.AffineTransform(3)
    out.SetFixedParameters(read.GetFixedParameters())
    out.SetParameters(read.GetParameters())
    return out


#: The affine stage under the demons registration (the plan's ``demons_affine``, one of
#: :data:`~semisam_o1.choices.DEMONS_AFFINES`): name -> register(fixed, moving).
DEMONS_AFFINES = dict(zip(choices.DEMONS_AFFINES, (affine_register, ants_affine_register)))


def demons_register(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, iterations: int = 30) -> sitk.Transform:
    """Deformable refinement on top of an affine ``initial`` (fixed -> moving physical points): SimpleITK's
    fast symmetric-forces demons (``iterations``, field smoothing sigma 1.5 voxels, one thread) between
    ``fixed`` and the affinely resampled ``moving``, histogram-matched to ``fixed`` first.

    Returns:
        ``sitk.CompositeTransform`` (``initial``, then a displacement field on the fixed grid) mapping fixed
        physical points (mm) to moving physical points (mm).
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    warped = sitk.Resample(moving, fixed, initial, sitk.sitkLinear, 0.0)
    warped = sitk.HistogramMatching(warped, fixed, 256, 7, True)
    dem = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    dem.SetNumberOfIterations(iterations)
    dem.SetStandardDeviations(1.5)
    dem.SetNumberOfThreads(1)
    field = dem.Execute(fixed, warped)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.CompositeTransform(3)
    out.AddTransform(initial)
    out.AddTransform(disp)
    return out


def syn_register(fixed: sitk.Image, moving: sitk.Image, seed: int = 1) -> sitk.Transform:
    """ANTs SyN (``antspyx``: ``ants.registration(type_of_transform="SyN")``, its own affine first) of
    ``moving`` (template) to ``fixed`` (target), composed into one displacement field on the fixed grid.

    Runs under :func:`deterministic_ants` (``seed``, one thread), so the same pair gives the same field
    in every process (server, jobs, Ray workers) as long as the process's first ANTs call ran under it.

    Returns:
        ``sitk.DisplacementFieldTransform`` mapping fixed physical points (mm) to moving physical points (mm).
    """
    with _ants_pair(fixed, moving, seed) as (ants, f, m, tmp):
        reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN", outprefix=str(tmp / "syn_"))
        composed = ants.apply_transforms(fixed=f, moving=m, transformlist=reg["fwdtransforms"], compose=str(tmp / "all_"))
        if composed is None:
            raise RuntimeError("ANTs could not compose the SyN transforms")
        field = read_sitk(composed, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


def map_voxels(fixed: sitk.Image, transform: sitk.Transform, moving: sitk.Image, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Continuous moving-image voxel index of every fixed voxel (of slabs ``start:stop`` along axis 0), vectorised.

    Works for any SimpleITK transform (affine, B-spline, composite): the transform is sampled as a
    displacement field on the fixed grid, added to the fixed voxels' physical points, and the result
    is converted to moving voxel indices with the moving image's origin, spacing and direction.

    Args:
        fixed: target image, size ``(D, H, W)`` in nibabel order; only its grid is read, so the grid
            alone (:func:`~semisam_o1.volumes.read_sitk_grid`) serves as well.
        transform: fixed physical point -> moving physical point (as from :func:`affine_register`).
        moving: template image (or its grid).
        start, stop: the fixed slabs (nibabel axis 0 indices) to map; default all. Memory is
            proportional to the slabs mapped, so large volumes are mapped a slab range at a time.

    Returns:
        ``(stop - start, H, W, 3)`` float32: for fixed voxel ``[i, j, k]`` (nibabel order) its continuous voxel
        index in ``moving``, also in nibabel order (units: moving voxels; may fall outside the
        moving image's bounds).
    """
    size = list(fixed.GetSize())
    stop = size[0] if stop is None else min(stop, size[0])
    size[0] = stop - start
    fdir = np.asarray(fixed.GetDirection(), np.float64).reshape(3, 3)
    fspacing = np.asarray(fixed.GetSpacing(), np.float64)
    origin = tuple(float(v) for v in np.asarray(fixed.GetOrigin()) + fdir @ (fspacing * [start, 0, 0]))  # physical point of voxel (start, 0, 0)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, size, origin, fixed.GetSpacing(), fixed.GetDirection()
    )
    disp = sitk_to_dhw(field, view=True)  # (D, H, W, 3) = (x, y, z, 3); field stays alive below
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij"), -1)
    idx[..., 0] += start
    phys = np.asarray(fixed.GetOrigin()) + (idx * fspacing) @ fdir.T
    phys += disp
    mdir = np.asarray(moving.GetDirection(), np.float64).reshape(3, 3)
    # physical = origin + dir @ (spacing * index)  =>  index = (dir^-1 @ (physical - origin)) / spacing
    midx = ((phys - np.asarray(moving.GetOrigin())) @ np.linalg.inv(mdir).T) / np.asarray(moving.GetSpacing())
    return midx.astype(np.float32)


def shrink(image: sitk.Image, factors: tuple[int, int, int]) -> sitk.Image:
    """``image`` averaged over bins of ``factors`` voxels per axis (same physical extent; all 1: unchanged)."""
    return image if max(factors) <= 1 else sitk.BinShrink(image, [int(f) for f in factors])


def warp_label(label: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """The template ``label`` resampled (nearest neighbour) onto the ``fixed`` grid (an image, or its
    grid alone: :func:`~semisam_o1.volumes.read_sitk_grid`): ``(D, H, W)`` uint8, nibabel order."""
    out = sitk.Resample(label, fixed.GetSize(), transform, sitk.sitkNearestNeighbor, fixed.GetOrigin(), fixed.GetSpacing(),
                        fixed.GetDirection(), 0, sitk.sitkUInt8)
    return np.ascontiguousarray(sitk_to_dhw(out))


class RegistrationError(InputError):
    """A template could not be registered to a target (e.g. the volumes do not overlap)."""


def nib_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """An image file's voxel shape and spacing (mm) from its header."""
    import nibabel as nib

    header = nib.load(str(path)).header
    return tuple(int(n) for n in header.get_data_shape()[:3]), tuple(float(z) for z in header.get_zooms()[:3])


class RegistrationCache:
    """Target -> template registrations, each computed once per pair and method and kept on disk.

    Files: ``<folder>/<sha256(target)[:20]>-<sha256(template)[:20]>-affine-<method>[-shrink<f>-<f>].npz``
    (:func:`save_transform`); ``method`` is ``demons`` (affine + diffeomorphic demons, SimpleITK) or ``syn``
    (ANTs SyN). The demons' affine stage is the plan's ``demons_affine`` (:data:`DEMONS_AFFINES`); other than
    the default ``sitk`` it is named in the file (``-antsaffine-demons``). Volumes above the plan's ``registration_voxels`` are registered on a copy shrunk by the plan's
    factors (bin average), named in the file. A file lock makes concurrent requests for one pair register it once.

    Args:
        folder: where the files go (``<studies>/.semisam/registration``).
        plan: the datastore's :class:`~semisam_o1.stage_one.plan.Plan` (its ``registration_shrink``).
    """

    def __init__(self, folder: Path, plan):
        self.folder, self.plan = Path(folder), plan

    def path(self, target: Path, template: Path, method: str) -> Path:
        """The cache file of ``method``'s registration of ``template`` to ``target``."""
        factors = ["".join(map(str, self.plan.registration_shrink(*nib_geometry(p)))) for p in (target, template)]
        grid = "" if factors == ["111", "111"] else f"-shrink{factors[0]}-{factors[1]}"
        affine = "affine" if method != "demons" or self.plan.demons_affine == "sitk" else f"{self.plan.demons_affine}affine"
        return self.folder / f"{sha256(target)[:20]}-{sha256(template)[:20]}-{affine}-{method}{grid}.npz"

    def transform(self, target: Path, template: Path, method: str) -> sitk.Transform:
        """Target -> template transform (physical mm), registered now or read from its file.

        Raises:
            RegistrationError: naming both images, when the registration fails (e.g. no overlap).
        """
        path = self.path(target, template, method)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{path}.lock"):  # one registration per pair: a job or another request may be at it
                if not path.exists():
                    fixed, moving = read_image(target), read_image(template)
                    fixed = shrink(fixed, self.plan.registration_shrink(fixed.GetSize(), fixed.GetSpacing()))
                    moving = shrink(moving, self.plan.registration_shrink(moving.GetSize(), moving.GetSpacing()))
                    try:
                        if method == "syn":
                            transform = syn_register(fixed, moving)
                        else:
                            transform = demons_register(fixed, moving, DEMONS_AFFINES[self.plan.demons_affine](fixed, moving))
                    except Exception as e:
                        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                        raise RegistrationError(
                            f"{Path(target).name}: registration ({method}) to template {Path(template).name} failed: {reason}"
                        ) from None
                    remove_interrupted_writes(path)  # a writer killed before us left its temporary file
                    save_transform(transform, path)
                    return transform
        return load_transform(path)
