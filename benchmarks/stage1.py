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

import json
import sys
import time

import numpy as np
from common import CLASSES, build_datastore, parser, peak_rss_bytes, source_or_exit, write_result
from tqdm import tqdm

from semisam_o1.config import AppConfig
from semisam_o1.evaluation import scores
from semisam_o1.pipeline import build_stage_one, open_datastore
from semisam_o1.registration import read_image, warp_label
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label


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
    p = parser(__doc__, "stage1", test_split=False)
    p.add_argument("--limit", type=int, default=None, help="only the first N pool volumes")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = p.parse_args(argv)

    source = source_or_exit()
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
        "peak_rss_bytes": peak_rss_bytes(),
        "template": args.template,
        "pool_size": len(pool),
        "settings": stage_one.cache.settings_id,
        "conf": dict(args.conf),
        "per_case": {case: {"ours": o, "atlas_affine": a} for case, o, a in zip(pool, ours, atlas)},
    }
    write_result(result, args.out, [
        f"stage one  mean Dice {result['dice_mean']:.3f}  {json.dumps({n: round(v, 3) for n, v in result['dice_per_class'].items()})}",
        f"atlas aff. mean Dice {result['atlas_affine_dice_mean']:.3f}  ratio {result['dice_mean'] / result['atlas_affine_dice_mean']:.3f}",
        f"encoder {result['encoder_seconds_per_slice']} s/slice; infer p50 {result['infer_p50_seconds']:.3f} s, p95 {result['infer_p95_seconds']:.3f} s",
        f"cache {result['cache_bytes_per_voxel']:.1f} B/voxel; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
