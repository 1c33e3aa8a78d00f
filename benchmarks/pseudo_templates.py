"""Pseudo-templates on hippocampus: which label-free signal predicts stage one's Dice, and what k pseudo-templates add.

    python benchmarks/pseudo_templates.py [--k 3] [--limit N] [--out benchmarks/results/pseudo_templates.json]

In the shared work datastore (``benchmarks/out/stage1``, template ``hippocampus_001``, the other 59
volumes the pool), in one run on the same cases:

1. stage one (app defaults) on every pool volume: Dice against the truth and the label-free signals
   a stage-two run can see -- :func:`~semisam_o1.stage_two.rounds.stage_one_trust` (the safety floor's
   vote/warp agreement), the mean confidence on the predicted foreground, the mean confidence
   overall, the vote/warp volume-ratio deviation; Spearman correlation of each with the Dice.
2. the ``k`` volumes with the highest trust become pseudo-templates (their stage-one label as template
   label, what ``--conf pseudo_templates k`` does in round 0); every other volume is labelled again from
   the real template + the pseudo-templates: mean Dice before / after on those same volumes.

Rows are kept in ``<work>/pseudo_templates_rows.json``, so a stopped run resumes; the JSON is rewritten
every 10 volumes (``"complete": false`` until all are done).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from common import CLASSES, build_datastore, parser, source_or_exit, write_result
from scipy.stats import spearmanr
from semisam_o1.config import AppConfig
from semisam_o1.evaluation import class_dice
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_two.round_zero import stage_one_trust
from semisam_o1.templates import Template, find_templates
from semisam_o1.volumes import load_image, load_label, save_label
from tqdm import tqdm

SIGNALS = ("trust", "confidence_foreground", "confidence_all", "volume_ratio_deviation")


def signals(prediction) -> dict:
    fg = prediction.label > 0
    return {
        "trust": stage_one_trust(prediction),
        "confidence_foreground": float(prediction.confidence[fg].mean()) if fg.any() else 0.0,
        "confidence_all": float(prediction.confidence.mean()),
        "volume_ratio_deviation": float(np.mean([abs(np.log(max(f["volume_ratio"], 1e-3))) for f in prediction.floor.values()])),
    }


def main(argv=None) -> int:
    p = parser(__doc__, "pseudo_templates", test_split=False)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="only the first N pool volumes")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = p.parse_args(argv)
    source = source_or_exit()
    studies, pool = build_datastore(args.work, source, args.template, args.limit)
    stage_one = build_stage_one(studies, AppConfig.from_conf({"labels": "anterior=1,posterior=2", **dict(args.conf)}))
    templates = find_templates(open_datastore(studies))
    rows_path = studies / f"pseudo_templates_rows{'-' + '-'.join(f'{k}_{v}' for k, v in args.conf) if args.conf else ''}.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {"stage1": {}, "with_pseudo": {}}
    labels_dir = studies / ".semisam" / "pseudo-template-labels"
    n_classes = 1 + max(CLASSES.values())

    def dice(label, case) -> float:
        truth = load_label(source.labels / f"{case}.nii.gz", load_image(studies / f"{case}.nii.gz"))
        return float(class_dice(label, truth, n_classes).mean())

    start = time.perf_counter()
    for case in tqdm(pool, desc="stage 1", unit="image"):
        if case in rows["stage1"]:
            continue
        prediction = stage_one.predict(studies / f"{case}.nii.gz", templates)
        save_label(prediction.label, prediction.image, labels_dir / f"{case}.nii.gz")
        rows["stage1"][case] = {"dice": dice(prediction.label, case), **signals(prediction)}
        rows_path.write_text(json.dumps(rows))
    dices = np.array([rows["stage1"][c]["dice"] for c in pool])
    correlation = {s: round(float(spearmanr([rows["stage1"][c][s] for c in pool], dices).correlation), 3) for s in SIGNALS}

    chosen = sorted(pool, key=lambda c: (-rows["stage1"][c]["trust"], c))[: args.k]
    pseudo = [Template(c, studies / f"{c}.nii.gz", labels_dir / f"{c}.nii.gz") for c in chosen]
    rest = [c for c in pool if c not in chosen]

    def write() -> None:
        done = [c for c in rest if c in rows["with_pseudo"]]
        before = float(np.mean([rows["stage1"][c]["dice"] for c in done])) if done else None
        after = float(np.mean([rows["with_pseudo"][c] for c in done])) if done else None
        result = {
            "complete": len(done) == len(rest), "pool_size": len(pool), "k": args.k, "conf": dict(args.conf),
            "stage1_dice_pool": round(float(dices.mean()), 4),
            "spearman_signal_vs_dice": correlation,
            "pseudo_templates": {c: {"trust": round(rows["stage1"][c]["trust"], 4), "true_dice": round(rows["stage1"][c]["dice"], 4)} for c in chosen},
            "cases_relabelled": len(done),
            "stage1_dice": None if before is None else round(before, 4),
            "with_pseudo_templates_dice": None if after is None else round(after, 4),
            "gain": None if before is None else round(after - before, 4),
            "better_cases": sum(rows["with_pseudo"][c] > rows["stage1"][c]["dice"] for c in done),
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_result(result, args.out, [f"signals vs Dice (Spearman): {correlation}",
                                        f"pseudo-templates {chosen}: on {len(done)}/{len(rest)} others {before} -> {after}"])

    for n, case in enumerate(tqdm(rest, desc=f"stage 1 + {args.k} pseudo-templates", unit="image"), 1):
        if case not in rows["with_pseudo"]:
            rows["with_pseudo"][case] = dice(stage_one.predict(studies / f"{case}.nii.gz", [*templates, *pseudo]).label, case)
            rows_path.write_text(json.dumps(rows))
        if n % 10 == 0:
            write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
