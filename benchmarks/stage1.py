"""Stage-one benchmark: template propagation vs single-atlas affine registration, on MSD Task04.

    python benchmarks/stage1.py [--template hippocampus_001] [--limit N] [--out benchmarks/results/stage1.json]

Builds a datastore of the 60 hippocampus volumes (one template label in ``labels/final``) under
``benchmarks/out/stage1`` (features and registrations are cached there, so a rerun skips encoding),
runs the app's own :class:`~semisam_o1.stage_one.predictor.StageOne` on every other volume and reports, in one
run: per-class and mean Dice and HD95 (MONAI metrics) of stage one and of the single-atlas baselines
(the template label warped by the same affine registration, and by affine + demons), encoder
seconds per slice and per volume and registration seconds (timed on ``--time-encoder`` volumes,
recomputed), infer latency from cache (p50/p95), cache bytes per voxel and peak RSS.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from common import CLASSES, build_datastore, parser, peak_rss_bytes, source_or_exit, write_result
from semisam_o1.active_learning import SCORE_KEY
from semisam_o1.config import AppConfig
from semisam_o1.evaluation import scores
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_one.predictor import StageOne
from semisam_o1.stage_one.registration import affine_register, demons_register, read_image, warp_label
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.tasks.uncertainty_scoring import UncertaintyScoring
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label
from tqdm import tqdm


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
    p.add_argument("--time-encoder", type=int, default=5, help="volumes encoded again to time the encoder")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = p.parse_args(argv)

    source = source_or_exit()
    studies, pool = build_datastore(args.work, source, args.template, args.limit)
    config = AppConfig.from_conf({"labels": "anterior=1,posterior=2", **dict(args.conf)})
    stage_one = build_stage_one(studies, config)
    datastore = open_datastore(studies)
    templates = find_templates(datastore)

    # 1. features: every volume encoded once (cached); the encoder's cost is timed on the first
    #    --time-encoder volumes, encoded again without the cache so a rerun measures it too
    for case in tqdm([args.template, *pool], desc="features", unit="image"):
        stage_one.cache.get_or_compute(load_image(studies / f"{case}.nii.gz"))
    encode_seconds, encoded_slices = 0.0, 0
    timed = pool[: args.time_encoder]
    for case in tqdm(timed, desc="encoder timing", unit="image"):
        image = load_image(studies / f"{case}.nii.gz")
        start = time.perf_counter()
        stage_one.cache.compute(image)  # the cache's own streamed path, without writing
        encode_seconds += time.perf_counter() - start
        stride = stage_one.cache.stride(image)
        encoded_slices += sum(-(-image.array.shape[a] // stride[a]) for a in config.stage_one_params().encoder_axes)

    # 2. registrations (cached too; timed again on the same volumes), then 3. infer from cache, timed per volume
    for case in tqdm(pool, desc="register", unit="image"):
        for method in stage_one.methods:
            stage_one.transform(studies / f"{case}.nii.gz", templates[0].image_path, method)
    register_seconds = []
    for case in timed:
        start = time.perf_counter()
        fixed, moving = read_image(studies / f"{case}.nii.gz"), read_image(templates[0].image_path)
        demons_register(fixed, moving, affine_register(fixed, moving))
        register_seconds.append(time.perf_counter() - start)

    # the single-atlas baselines always use affine + demons (stage one's own prior may be another method)
    demons = stage_one if stage_one.registration == "demons" else StageOne(studies, stage_one.cache, label_names=config.labels, registration="demons", params=stage_one.params)
    latencies, ours, atlas, atlas_demons, prototype = [], [], [], [], []
    paper = StageOne(studies, stage_one.cache, stage_one.label_values, propagation="prototype")  # the paper's stage one, same features
    template_label = read_image(templates[0].label_path)
    for case in tqdm(pool, desc="propagate", unit="image"):
        path = studies / f"{case}.nii.gz"
        start = time.perf_counter()
        prediction = stage_one.predict(path, templates)
        latencies.append(time.perf_counter() - start)
        truth = load_label(source.labels / f"{case}.nii.gz", prediction.image)
        ours.append(scores(prediction.label, truth, CLASSES))
        transform = demons.transform(path, templates[0].image_path)  # composite: affine, then demons
        atlas.append(scores(warp_label(template_label, read_image(path), transform.GetNthTransform(0)), truth, CLASSES))
        atlas_demons.append(scores(warp_label(template_label, read_image(path), transform), truth, CLASSES))
        prototype.append(scores(paper.predict(path, templates).label, truth, CLASSES))

    # 4. active learning: one 'uncertainty' scoring pass over the whole pool from the caches
    #    (stage-one source: no network in an empty stage-two folder), as the server runs it
    scoring = UncertaintyScoring(StageTwo(studies, stage_one, work=args.work / "scoring-stage2"))
    for case in pool:  # make every score stale so the pass recomputes all of them
        datastore.update_image_info(case, {SCORE_KEY: {}})
    start = time.perf_counter()
    scored = scoring({}, datastore)["scored"]
    scoring_seconds = time.perf_counter() - start

    cache_images = [load_image(studies / f"{case}.nii.gz") for case in [args.template, *pool]]
    cache_bytes = sum(stage_one.cache.path(image.path).stat().st_size for image in cache_images)
    cache_voxels = sum(image.array.size for image in cache_images)  # bytes per IMAGE voxel
    ours_s, atlas_s, demons_s, proto_s = summarize(ours), summarize(atlas), summarize(atlas_demons), summarize(prototype)
    result = {
        "dice_mean": ours_s["mean_dice"],
        "dice_per_class": {n: ours_s[n]["dice"] for n in CLASSES},
        "hd95_per_class": {n: ours_s[n]["hd95"] for n in CLASSES},
        "atlas_affine_dice_mean": atlas_s["mean_dice"],
        "atlas_affine_dice_per_class": {n: atlas_s[n]["dice"] for n in CLASSES},
        "atlas_affine_hd95_per_class": {n: atlas_s[n]["hd95"] for n in CLASSES},
        "atlas_affine_demons_dice_mean": demons_s["mean_dice"],
        "atlas_affine_demons_dice_per_class": {n: demons_s[n]["dice"] for n in CLASSES},
        "dice_prototype_stage1": proto_s["mean_dice"],
        "dice_prototype_stage1_per_class": {n: proto_s[n]["dice"] for n in CLASSES},
        "encoder_seconds_per_slice": encode_seconds / encoded_slices if encoded_slices else None,
        "encoder_seconds_per_volume": encode_seconds / len(timed) if timed else None,
        "encoder_timed_volumes": len(timed),
        "registration_seconds_p50": float(np.percentile(register_seconds, 50)) if register_seconds else None,
        "infer_p50_seconds": float(np.percentile(latencies, 50)),
        "infer_p95_seconds": float(np.percentile(latencies, 95)),
        "uncertainty_scoring_seconds_pool": scoring_seconds,
        "uncertainty_scored_images": scored,
        "cache_bytes_per_voxel": cache_bytes / cache_voxels,
        "peak_rss_bytes": peak_rss_bytes(),
        "template": args.template,
        "pool_size": len(pool),
        "settings": stage_one.cache.settings_id,
        "conf": dict(args.conf),
        "per_case": {case: {"ours": o, "atlas_affine": a, "atlas_affine_demons": d} for case, o, a, d in zip(pool, ours, atlas, atlas_demons)},
    }
    write_result(result, args.out, [
        f"stage one  mean Dice {result['dice_mean']:.3f}  {json.dumps({n: round(v, 3) for n, v in result['dice_per_class'].items()})}",
        f"atlas affine {result['atlas_affine_dice_mean']:.3f} (ratio {result['dice_mean'] / result['atlas_affine_dice_mean']:.3f}), affine+demons {result['atlas_affine_demons_dice_mean']:.3f}",
        f"paper's stage one (class prototypes) {result['dice_prototype_stage1']:.3f}",
        f"encoder {result['encoder_seconds_per_slice']} s/slice; infer p50 {result['infer_p50_seconds']:.3f} s, p95 {result['infer_p95_seconds']:.3f} s",
        f"cache {result['cache_bytes_per_voxel']:.1f} B/voxel; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB; "
        f"uncertainty scoring of {scored} images {scoring_seconds:.1f} s",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
