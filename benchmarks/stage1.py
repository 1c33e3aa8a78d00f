"""Stage-one benchmark: template propagation vs single-atlas affine registration, on MSD Task04.

    python benchmarks/stage1.py [--template hippocampus_001] [--limit N] [--out benchmarks/results/stage1.json]

Builds a datastore of the 60 hippocampus volumes (one template label in ``labels/final``) under
``benchmarks/out/stage1`` (features and registrations are cached there, so a rerun skips encoding),
runs the app's own :class:`~semisam_o1.stage_one.StageOne` on every other volume and reports, in one
run: per-class and mean Dice and HD95 (MONAI metrics) of stage one and of the affine atlas (the
template label warped by the same affine registration), encoder seconds per slice and per volume,
infer latency from cache (p50/p95), cache bytes per voxel and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from semisam_o1 import PROJECT_ROOT
from semisam_o1.config import AppConfig
from semisam_o1.evaluation import scores
from semisam_o1.pipeline import build_stage_one, open_datastore
from semisam_o1.registration import read_image, warp_label
from semisam_o1.sample_data import find_local_source
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label

CLASSES = {"anterior": 1, "posterior": 2}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def build_datastore(root: Path, source, template: str, limit: int | None) -> tuple[Path, list[str]]:
    """Images linked into ``root``, the template's label as its only ``final`` label."""
    ids = sorted(p.name[: -len(".nii.gz")] for p in source.images.glob("*.nii.gz"))
    pool = [i for i in ids if i != template][:limit]
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case in [template, *pool]:
        dst = root / f"{case}.nii.gz"
        if not dst.exists():
            shutil.copy(source.images / f"{case}.nii.gz", dst)
    shutil.copy(source.labels / f"{template}.nii.gz", root / "labels" / "final" / f"{template}.nii.gz")
    return root, pool


def summarize(per_case: list[dict]) -> dict:
    out = {}
    for name in CLASSES:
        out[name] = {
            "dice": float(np.mean([c[name]["dice"] for c in per_case])),
            "hd95": float(np.nanmean([c[name]["hd95"] for c in per_case])),
        }
    out["mean_dice"] = float(np.mean([out[n]["dice"] for n in CLASSES]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="hippocampus_001")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pool volumes")
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "benchmarks" / "out" / "stage1")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "stage1.json")
    parser.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = parser.parse_args(argv)

    source = find_local_source()
    if source is None:
        print("error: ../shared/data/hippocampus not found (set SEMISAM_SAMPLE_SOURCE)", file=sys.stderr)
        return 2
    studies, pool = build_datastore(args.work, source, args.template, args.limit)
    config = AppConfig.from_conf({"labels": "anterior=1,posterior=2", **dict(args.conf)})
    stage_one = build_stage_one(studies, config)
    datastore = open_datastore(studies)
    templates = find_templates(datastore)

    # 1. features (the encoder's cost), timed on the volumes not yet cached
    encode_seconds, encoded_slices, encoded_volumes = 0.0, 0, 0
    for case in tqdm([args.template, *pool], desc="features", unit="image"):
        image = load_image(studies / f"{case}.nii.gz")
        if stage_one.cache.get(image) is None:
            start = time.perf_counter()
            stage_one.cache.get_or_compute(image)
            encode_seconds += time.perf_counter() - start
            encoded_slices += sum(image.array.shape[a] for a in config.encoder_axes)
            encoded_volumes += 1

    # 2. registrations (cached too), then 3. infer from cache, timed per volume
    register_seconds = []
    for case in tqdm(pool, desc="register", unit="image"):
        start = time.perf_counter()
        stage_one.transform(studies / f"{case}.nii.gz", templates[0].image_path)
        register_seconds.append(time.perf_counter() - start)

    latencies, ours, atlas = [], [], []
    template_label = read_image(templates[0].label_path)
    for case in tqdm(pool, desc="propagate", unit="image"):
        path = studies / f"{case}.nii.gz"
        start = time.perf_counter()
        prediction = stage_one.predict(path, templates)
        latencies.append(time.perf_counter() - start)
        truth = load_label(source.labels / f"{case}.nii.gz", prediction.image)
        ours.append(scores(prediction.label, truth, CLASSES))
        warped = warp_label(template_label, read_image(path), stage_one.transform(path, templates[0].image_path))
        atlas.append(scores(warped, truth, CLASSES))

    cache_files = [p for p in stage_one.cache.root.glob("*.npy")]
    cache_bytes = sum(p.stat().st_size for p in cache_files)
    cache_voxels = sum(int(np.prod(np.load(p, mmap_mode="r").shape[1:])) for p in cache_files)
    ours_s, atlas_s = summarize(ours), summarize(atlas)
    result = {
        "dice_mean": ours_s["mean_dice"],
        "dice_per_class": {n: ours_s[n]["dice"] for n in CLASSES},
        "hd95_per_class": {n: ours_s[n]["hd95"] for n in CLASSES},
        "atlas_affine_dice_mean": atlas_s["mean_dice"],
        "atlas_affine_dice_per_class": {n: atlas_s[n]["dice"] for n in CLASSES},
        "atlas_affine_hd95_per_class": {n: atlas_s[n]["hd95"] for n in CLASSES},
        "encoder_seconds_per_slice": encode_seconds / encoded_slices if encoded_slices else None,
        "encoder_seconds_per_volume": encode_seconds / encoded_volumes if encoded_volumes else None,
        "encoded_volumes_this_run": encoded_volumes,
        "registration_seconds_p50": float(np.percentile(register_seconds, 50)),
        "infer_p50_seconds": float(np.percentile(latencies, 50)),
        "infer_p95_seconds": float(np.percentile(latencies, 95)),
        "cache_bytes_per_voxel": cache_bytes / cache_voxels,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "template": args.template,
        "pool_size": len(pool),
        "settings": stage_one.cache.settings_id,
        "conf": dict(args.conf),
        "per_case": {case: {"ours": o, "atlas_affine": a} for case, o, a in zip(pool, ours, atlas)},
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"stage one  mean Dice {result['dice_mean']:.3f}  {json.dumps({n: round(v, 3) for n, v in result['dice_per_class'].items()})}")
    print(f"atlas aff. mean Dice {result['atlas_affine_dice_mean']:.3f}  ratio {result['dice_mean'] / result['atlas_affine_dice_mean']:.3f}")
    print(f"encoder {result['encoder_seconds_per_slice']} s/slice; infer p50 {result['infer_p50_seconds']:.3f} s, p95 {result['infer_p95_seconds']:.3f} s")
    print(f"cache {result['cache_bytes_per_voxel']:.1f} B/voxel; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
