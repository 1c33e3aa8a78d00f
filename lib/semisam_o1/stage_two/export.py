"""The published stage-two network as a MONAI Bundle that MONAI alone runs (``python -m monai.bundle run``), with
the server's preprocessing, inference and post-processing written as MONAI components in its configs.

A bundle folder (:data:`BUNDLE_FILES`)::

    configs/metadata.json   MONAI's metadata (network_data_format, versions) and this app's: label_map,
                            intensity_normalisation, spacing, inference (what the server does, in words and numbers)
    configs/inference.json  LoadImaged (nibabel) -> EnsureChannelFirstd -> ScaleIntensityRangePercentilesd (MRI) or
                            ScaleIntensityRanged (CT) -> the network's grid -> SlidingWindowInferer over mirrored
                            copies (mean softmax) -> the image's grid -> AsDiscreted(argmax) -> SaveImaged
    configs/logging.conf    MONAI's usual console logging
    models/model.pt         the network's state_dict (MONAI's UNet, ``network_def`` in inference.json)
    models/model.ts         the same network as TorchScript (``monai.bundle.ckpt_export``; metadata.json and
                            inference.json inside, as MONAI Deploy reads them)
    docs/README.md          how to run it

What the server does and the bundle repeats (:meth:`~semisam_o1.stage_two.published.PublishedModel.predict`):

- the image in its file's voxel order (nibabel, nothing reoriented or resampled to a fixed spacing), float32;
- intensities to [0, 1]: MRI the volume's 0.5th..99.5th percentile, CT the window -160..240 HU, clipped;
- the network's grid: the image shrunk by area averaging to ``ceil(n / f)`` voxels per axis, ``f`` the integer factors
  of :func:`~semisam_o1.stage_one.plan.shrink_factors` for the checkpoint's ``grid_voxels`` (identity for an image under
  it); a config expression, as MONAI has no transform that computes a per-image size;
- sliding windows (the patch, 4 per batch, overlap 0.25, Gaussian weights) on the image and on one mirrored copy per
  axis in the checkpoint's ``flip_axes``; softmax of each, mirrored back, averaged (no MC dropout);
- the class probabilities back to the image's grid by trilinear interpolation, argmax, uint8 label with the image's
  affine.

MONAI has no transform for the flip averaging nor for the per-image grid size, so inference.json writes them as
``$`` expressions of torch calls (no code outside MONAI, torch and the standard library).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch

from semisam_o1.stage_one.normalize import CT_WINDOW, MRI_PERCENTILES

#: The files of an exported bundle, relative to its root.
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt", "models/model.ts",
                "docs/README.md")
#: Sliding-window settings of :func:`~semisam_o1.stage_two.network.predict_with_uncertainty` (the server's).
SW_BATCH_SIZE, SW_OVERLAP, SW_MODE = 4, 0.25, "gaussian"
#: The bundle's name (MONAI Label serves a bundle folder under its folder's name).
BUNDLE_NAME = "semisam_o1"

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


class NothingPublished(LookupError):
    """No stage-two network is published yet (nothing to export)."""

    def __init__(self, message: str = "no stage-two network is published yet: train first (POST /train/semisam_o1 or main.py pipeline)"):
        super().__init__(message)


def inference_config(checkpoint: dict, patch: Sequence[int], modality: str) -> dict:
    """``configs/inference.json`` for a checkpoint written by :func:`~semisam_o1.stage_two.network.save_network`
    (its ``n_classes``, ``channels``, ``dropout``, ``grid_voxels``, ``flip_axes``), the server's inference ``patch``
    (voxels per axis, D, H, W) and ``modality`` (``mri`` or ``ct``).

    Inputs: ``datalist`` (default: every ``*.nii.gz``/``*.nii`` in ``dataset_dir``); outputs: ``<output_dir>/<image
    name>_seg.nii.gz``, uint8 labels on each image's grid. Overridable ids: ``bundle_root``, ``dataset_dir``,
    ``datalist``, ``output_dir``, ``device``, ``network`` (e.g. the TorchScript model)."""
    channels = [int(c) for c in checkpoint["channels"]]
    if modality == "mri":
        lo, hi = MRI_PERCENTILES
        normalise = {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": lo, "upper": hi, "b_min": 0.0, "b_max": 1.0,
                     "clip": True}
    elif modality == "ct":
        normalise = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": CT_WINDOW[0], "a_max": CT_WINDOW[1], "b_min": 0.0,
                     "b_max": 1.0, "clip": True}
    else:
        raise ValueError(f"unknown modality '{modality}' (mri, ct)")
    grid = checkpoint.get("grid_voxels")
    return {
        "imports": ["$import glob", "$import itertools", "$import math", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": int(checkpoint["n_classes"]),
            "channels": channels,
            "strides": [2] * (len(channels) - 1),
            "num_res_units": 2,
            "dropout": float(checkpoint["dropout"]),
        },
        "network": "$@network_def.to(@device)",
        # the network's grid (semisam_o1.stage_one.plan.shrink_factors): the finest axes shrink first, towards one
        # working spacing growing by 10 % a step, until the shrunk image has at most grid_voxels voxels or an axis is
        # down to 4; spacing from the NIfTI header's pixdim (else the affine's), as the server reads it
        "grid_voxels": int(grid) if grid else None,
        "shrink_factors": "$lambda shape, spacing: (1,) * len(shape) if not @grid_voxels else next(f for t in itertools.accumulate("
                          "itertools.repeat(1.1), lambda a, b: a * b, initial=min(spacing)) for f in [tuple(max(1, int(t / s + 1e-6)) "
                          "for s in spacing)] if math.prod(-(-n // k) for n, k in zip(shape, f)) <= @grid_voxels "
                          "or min(-(-n // k) for n, k in zip(shape, f)) <= 4)",
        "spacing_of": "$lambda x: [float(s) for s in (x.meta['pixdim'][1:4] if 'pixdim' in x.meta else x.pixdim)]",
        "network_shape": "$lambda x: tuple(-(-int(n) // k) for n, k in zip(x.shape[1:], @shrink_factors([int(n) for n in x.shape[1:]], "
                         "@spacing_of(x))))",
        "to_network_grid": "$lambda x: x if tuple(x.shape[1:]) == @network_shape(x) else "
                           "torch.nn.functional.interpolate(x[None], size=@network_shape(x), mode='area')[0]",
        "to_image_grid": "$lambda d: {**d, 'pred': d['pred'] if tuple(d['pred'].shape[1:]) == tuple(int(n) for n in "
                         "d['image'].meta['spatial_shape']) else torch.nn.functional.interpolate(d['pred'][None], size=tuple(int(n) "
                         "for n in d['image'].meta['spatial_shape']), mode='trilinear', align_corners=False)[0]}",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "dtype": "$numpy.float32", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                normalise,
                {"_target_": "Lambdad", "keys": "image", "func": "@to_network_grid"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "sliding_window": {"_target_": "SlidingWindowInferer", "roi_size": [int(p) for p in patch], "sw_batch_size": SW_BATCH_SIZE,
                           "overlap": SW_OVERLAP, "mode": SW_MODE},
        "flip_dims": [[]] + [[int(a) + 2] for a in checkpoint["flip_axes"]],
        # (B, 1, D, H, W) -> (B, C, D, H, W) mean class probabilities over the image and one mirrored copy per axis;
        # the argument names are those of MONAI's Inferer.__call__ (MONAI Deploy passes them by name)
        "inferer": "$lambda inputs, network: sum(torch.flip(torch.softmax(@sliding_window(torch.flip(inputs, d), network), 1), d) "
                   "for d in @flip_dims) / len(@flip_dims)",
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Lambda", "func": "@to_image_grid"},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                 "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": False},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', False)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(checkpoint: dict, labels: dict[str, int], patch: Sequence[int], modality: str, median_spacing: Sequence[float] | None,
             model_version: str, app_version: str) -> dict:
    """``configs/metadata.json``: MONAI's fields (``network_data_format`` with one input channel ``image`` and the
    ``n_classes`` channels of ``pred``, named by ``labels`` ``{name: value}``; package versions) and this app's:
    ``label_map``, ``intensity_normalisation``, ``spacing`` (``median_spacing`` in mm: the datastore's planned median,
    ``None`` if not planned) and ``inference``."""
    import monai
    import nibabel
    import numpy

    n_classes = int(checkpoint["n_classes"])
    names = {v: n for n, v in labels.items()}
    channel_def = {str(c): "background" if c == 0 else names.get(c, f"label_{c}") for c in range(n_classes)}
    if modality == "mri":
        lo, hi = MRI_PERCENTILES
        normalisation = {"modality": "mri", "method": f"percentiles: the volume's {lo}th percentile -> 0, its {hi}th -> 1, clipped",
                         "transform": "ScaleIntensityRangePercentilesd", "lower": lo, "upper": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}
    else:
        normalisation = {"modality": "ct", "method": f"window: {CT_WINDOW[0]:g} HU -> 0, {CT_WINDOW[1]:g} HU -> 1, clipped",
                         "transform": "ScaleIntensityRanged", "a_min": CT_WINDOW[0], "a_max": CT_WINDOW[1], "b_min": 0.0, "b_max": 1.0,
                         "clip": True}
    grid = checkpoint.get("grid_voxels")
    try:
        import ignite

        optional = {"nibabel": nibabel.__version__, "pytorch-ignite": ignite.__version__}
    except ImportError:
        optional = {"nibabel": nibabel.__version__}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": app_version,
        "changelog": {app_version: f"exported from SemiSAM-O1 Label, published network {model_version}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": optional,
        "name": "SemiSAM-O1 stage-two network",
        "task": f"{'CT' if modality == 'ct' else 'MRI'} segmentation of {', '.join(names[v] for v in sorted(names))}",
        "description": "3D U-Net self-trained by SemiSAM-O1 Label from one annotated template (stage two), exported with the server's "
                       "preprocessing, flip-averaged sliding-window inference and post-processing; its labels are the server's.",
        "authors": "SemiSAM-O1 Label",
        "copyright": "trained on the exporting server's datastore: the licence of its images and labels applies",
        "intended_use": "research; labels for review by a clinician",
        "model_version": model_version,
        "label_map": dict(sorted(labels.items(), key=lambda kv: kv[1])),
        "intensity_normalisation": normalisation,
        "spacing": {
            "median_spacing_mm": [round(float(s), 6) for s in median_spacing] if median_spacing else None,
            "resampling": "none to a fixed spacing: each image in its file's voxel order and grid (not reoriented), shrunk by area "
                          "averaging to at most grid_voxels voxels (integer factors per axis, finest axes first); the label comes "
                          "back on the image's own grid",
            "grid_voxels": int(grid) if grid else None,
        },
        "inference": {"patch": [int(p) for p in patch], "sw_batch_size": SW_BATCH_SIZE, "overlap": SW_OVERLAP, "mode": SW_MODE,
                      "flip_axes": [int(a) for a in checkpoint["flip_axes"]],
                      "averaging": "softmax of the image and of one mirrored copy per flip axis, mirrored back and averaged",
                      "post": "trilinear back to the image's grid, argmax, uint8"},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT" if modality == "ct" else "MR", "num_channels": 1,
                                 "spatial_shape": [int(p) for p in patch], "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": n_classes,
                                 "spatial_shape": [int(p) for p in patch], "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": channel_def}},
        },
    }


BUNDLE_README = """# SemiSAM-O1 stage-two network (MONAI Bundle)

Exported from SemiSAM-O1 Label (published network {model_version}). Labels: {labels}.

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --dataset_dir <folder of .nii.gz images> --output_dir <folder>

writes `<image>_seg.nii.gz` (uint8, on the image's grid) for each image. `--datalist "['a.nii.gz']"` names files
instead; `--network '$torch.jit.load(@bundle_root + "/models/model.ts", map_location=@device)'` runs the TorchScript
model.

Preprocessing, inference and post-processing are the server's (configs/metadata.json: `intensity_normalisation`,
`spacing`, `inference`): images are used in their file's voxel order, never reoriented nor resampled to a fixed
spacing; intensities scaled to [0, 1] ({normalisation}); sliding windows of {patch} voxels averaged over mirrored
copies; argmax on the image's grid.
"""


def export_bundle(model_path: Path, out: Path, labels: dict[str, int], patch: Sequence[int], modality: str,
                  median_spacing: Sequence[float] | None = None, model_version: str = "", app_version: str = "0.1.0") -> Path:
    """Write the network checkpoint ``model_path`` (:func:`~semisam_o1.stage_two.network.save_network`'s format) as a
    MONAI Bundle in the folder ``out`` (created; the files of :data:`BUNDLE_FILES` are replaced, nothing else is
    touched). ``labels``: ``{name: value}``; ``patch``, ``modality``: the server's inference patch and intensity
    normalisation. Returns ``out``.

    Raises:
        NothingPublished: ``model_path`` does not exist.
    """
    from monai.bundle import ckpt_export

    model_path, out = Path(model_path), Path(out)
    if not model_path.exists():
        raise NothingPublished()
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    config = inference_config(checkpoint, patch, modality)
    meta = metadata(checkpoint, labels, patch, modality, median_spacing, model_version, app_version)
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    torch.save(checkpoint["state_dict"], out / "models" / "model.pt")
    with _quiet():  # MONAI logs its arguments at INFO; torch warns that TorchScript is deprecated
        ckpt_export(net_id="network_def", filepath=str(out / "models" / "model.ts"), ckpt_file=str(out / "models" / "model.pt"),
                    meta_file=str(out / "configs" / "metadata.json"), config_file=str(out / "configs" / "inference.json"),
                    bundle_root=str(out))
    (out / "docs" / "README.md").write_text(BUNDLE_README.format(
        model_version=model_version or "-", labels=", ".join(f"{v} {n}" for n, v in meta["label_map"].items()),
        normalisation=meta["intensity_normalisation"]["method"], patch="x".join(str(int(p)) for p in patch)))
    return out


@contextmanager
def _quiet():
    """MONAI's bundle loggers at WARNING and Python warnings ignored, for the duration."""
    monai_logger = logging.getLogger("monai.bundle.scripts")  # get_logger gives it its own level
    level = monai_logger.level
    monai_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        monai_logger.setLevel(level)


def bundle_zip(bundle: Path, archive: Path, name: str = BUNDLE_NAME) -> Path:
    """The bundle folder ``bundle`` as a zip file ``archive`` whose entries sit under ``<name>/`` (as the MONAI Model Zoo's
    bundles do: ``<name>/configs/metadata.json``, ...). Returns ``archive``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for relative in BUNDLE_FILES:
            z.write(Path(bundle) / relative, f"{name}/{relative}")
    return Path(archive)


def export_zip(export: Callable[[Path], Path], archive: Path, name: str = BUNDLE_NAME) -> Path:
    """``export(folder)`` (a bundle writer, e.g. ``NetworkInfer.export_bundle``) into a temporary folder, zipped to
    ``archive`` under ``<name>/`` (:func:`bundle_zip`); the folder is removed. Returns ``archive``."""
    tmp = Path(tempfile.mkdtemp(prefix="bundle-"))
    try:
        return bundle_zip(export(tmp / name), archive, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
