"""Curation benchmark: which strategy's picks make stage one best, label after label (oracle annotator).

    python benchmarks/curation.py [--steps 5] [--random-seeds 3] [--pool N] [--out benchmarks/results/curation.json]

MSD Task04 hippocampus. The fixed test set of ``benchmarks/stage2.py`` (last 15 ids) is never
offered; the pool is every other volume. Each run starts from template hippocampus_001 only; at
each step the app's own strategy (``uncertain``, ``diverse``, ``uncertain_diverse``, MONAI Label's
``random`` with several seeds) picks a pool volume over a real MONAI Label ``LocalDatastore``, the
oracle saves its ground truth as ``final`` (it becomes a template), the ``uncertainty`` scoring
method rescores the pool from stage one, and the test Dice of stage one with the current templates
is measured after 1, 2, 3 and 5 labels. Writes JSON (``margin_over_random_at_3``, curves, timings,
``machine``) and a PNG curve. Features and registrations are shared with ``benchmarks/stage1.py``.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import CLASSES, build_datastore, parser, source_or_exit, split, write_result
from monailabel.tasks.activelearning.random import Random
from semisam_o1.config import AppConfig
from semisam_o1.evaluation import mean_dice, scores
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.report import curve_plot
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.tasks.strategies import Diverse, Uncertain, UncertainDiverse
from semisam_o1.tasks.uncertainty_scoring import UncertaintyScoring
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label
from tqdm import tqdm

EVAL_AT = (1, 2, 3, 5)


def fresh_datastore(root: Path, shared: Path, source, template: str, pool: list[str]):
    """A datastore of template + pool whose ``.semisam`` caches are the stage-one benchmark's."""
    if root.exists():
        shutil.rmtree(root)
    (root / "labels" / "final").mkdir(parents=True)
    for case in [template, *pool]:
        (root / f"{case}.nii.gz").symlink_to(shared / f"{case}.nii.gz")
    shutil.copy(source.labels / f"{template}.nii.gz", root / "labels" / "final")
    (root / ".semisam").symlink_to(shared / ".semisam", target_is_directory=True)
    return open_datastore(root)


def run(name, strategy, args, source, shared, pool, test, stage_one, seed=0) -> dict:
    """One curation run; returns test Dice after each label count in :data:`EVAL_AT` and the picks."""
    random.seed(seed)
    datastore = fresh_datastore(args.work / "curation", shared, source, args.template, pool)
    scoring = UncertaintyScoring(StageTwo(args.work / "curation", stage_one, work=args.work / "curation-stage2"))
    curve, picks, score_seconds, pick_seconds = {}, [], [], []
    for n_labels in range(1, args.steps + 1):
        if n_labels > 1:
            if name.startswith("uncertain"):
                start = time.perf_counter()
                scoring({}, datastore)
                score_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            image_id = strategy({"strategy": name, "client_id": "oracle"}, datastore)["id"]
            pick_seconds.append(time.perf_counter() - start)
            datastore.save_label(image_id, str(source.labels / f"{image_id}.nii.gz"), "final", {"oracle": True})
            picks.append(image_id)
        if n_labels in EVAL_AT:
            templates = find_templates(datastore)
            per_case = [scores(stage_one.predict(img.path, templates).label, truth, CLASSES) for img, truth in test.values()]
            curve[n_labels] = mean_dice(per_case)
            print(f"{name} seed {seed}: {n_labels} labels -> test Dice {curve[n_labels]:.4f} (picked {picks})", flush=True)
    return {"curve": curve, "picks": picks, "scoring_seconds": score_seconds, "pick_seconds": pick_seconds}


def main(argv=None) -> int:
    p = parser(__doc__, "curation")
    p.add_argument("--steps", type=int, default=5, help="labels at the end of a run (template included)")
    p.add_argument("--random-seeds", type=int, default=3)
    args = p.parse_args(argv)

    source = source_or_exit()
    shared, everything = build_datastore(args.work, source, args.template, None)
    test_ids, pool = split(args, everything)
    config = AppConfig.from_conf({"labels": "anterior=1,posterior=2"})
    stage_one = build_stage_one(shared, config)
    test = {}
    for i in tqdm(test_ids, desc="test set"):
        image = load_image(shared / f"{i}.nii.gz")
        test[i] = (image, load_label(source.labels / f"{i}.nii.gz", image))

    strategies = {
        "uncertain": [Uncertain(0)],
        "diverse": [Diverse(stage_one, 0)],
        "uncertain_diverse": [UncertainDiverse(stage_one, 0)],
        "random": [Random()] * args.random_seeds,
    }
    runs = {}
    for name, instances in strategies.items():
        runs[name] = [run(name, s, args, source, shared, pool, test, stage_one, seed) for seed, s in enumerate(instances)]

    curves = {name: {n: float(np.mean([r["curve"][n] for r in rs])) for n in EVAL_AT if n <= args.steps} for name, rs in runs.items()}
    best = max((n for n in curves if n != "random"), key=lambda n: curves[n][3])
    scoring_seconds = [s for r in runs["uncertain"] for s in r["scoring_seconds"]]
    result = {
        "margin_over_random_at_3": curves[best][3] - curves["random"][3],
        "best_strategy_at_3": best,
        "curves": curves,
        "random_per_seed": [r["curve"] for r in runs["random"]],
        "picks": {name: [r["picks"] for r in rs] for name, rs in runs.items()},
        "scoring_seconds_per_pass": scoring_seconds,
        "scoring_seconds_first_pass": scoring_seconds[0] if scoring_seconds else None,
        "pick_seconds_mean": {name: float(np.mean([s for r in rs for s in r["pick_seconds"]])) for name, rs in runs.items()},
        "template": args.template,
        "pool_size": len(pool),
        "test_ids": test_ids,
    }
    curve_plot({n: c for n, c in curves.items()}, args.out.with_suffix(".png"), xlabel="labelled volumes", ylabel="stage-one test Dice",
               title=f"curation: {len(pool)}-volume pool, {len(test_ids)} test volumes")
    write_result(result, args.out, [
        *(f"{name:18s} " + "  ".join(f"{n}: {d:.4f}" for n, d in c.items()) for name, c in curves.items()),
        f"margin over random after 3 labels ({best}): {result['margin_over_random_at_3']:+.4f}; scoring passes {[round(s, 1) for s in scoring_seconds]} s",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
