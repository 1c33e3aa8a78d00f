"""End-to-end benchmark: the README's main job on a fresh copy of the sample datastore, timed.

    python benchmarks/end_to_end.py [--work /tmp/semisam-bench/end-to-end] [--conf KEY VALUE ...]

Runs exactly what a user runs, as child processes and from nothing: ``main.py sample-data --studies
WORK`` (fills a new folder: 20 MSD hippocampus crops, template ``hippocampus_001``) then ``main.py
pipeline --studies WORK --truth WORK/truth --report WORK/report`` (encoding, stage one, every stage-two
round with the app's defaults). No cache is shared with the other benchmarks, so the time is a cold
start's. Reports wall seconds of each command, the largest peak RSS of the two, the stage-one time
from ``WORK/.semisam/stage1.json``, each round's seconds and ensemble, the published round, the pseudo-templates and the pool Dice per
round (from the report's ``rounds.json``), and whether the run stayed within the 20 min target.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import parser, write_result
from semisam_o1 import PROJECT_ROOT

#: the target for the sample datastore's whole pipeline on 2 CPU cores (seconds)
TARGET_SECONDS = 20 * 60


def timed(command: list[str]) -> tuple[float, str]:
    """Run ``command`` in the project root; (wall seconds, its stdout + stderr). A failed command ends the benchmark (exit naming it, with its stderr)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main(argv=None) -> int:
    p = parser(__doc__, "end_to_end", test_split=False)
    p.set_defaults(work=Path("/tmp/semisam-bench/end-to-end"))
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[], help="app option passed to pipeline")
    args = p.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    report = args.work / "report"
    conf = [x for key, value in args.conf for x in ("--conf", key, value)]

    sample_seconds, _ = timed([sys.executable, "main.py", "sample-data", "--studies", str(args.work)])
    pipeline_seconds, _ = timed([sys.executable, "main.py", "pipeline", "--studies", str(args.work), "--truth", str(args.work / "truth"),
                                 "--report", str(report), *conf])
    rounds = json.loads((report / "rounds.json").read_text())
    stage_one = json.loads((args.work / ".semisam" / "stage1.json").read_text())
    total = sample_seconds + pipeline_seconds
    result = {
        "conf": dict(args.conf),
        "sample_data_seconds": round(sample_seconds, 1),
        "pipeline_seconds": round(pipeline_seconds, 1),
        "total_seconds": round(total, 1),
        "target_seconds": TARGET_SECONDS,
        "within_target": total <= TARGET_SECONDS,
        "stage_one_seconds": stage_one["seconds"],
        "round_seconds": [r.get("seconds") for r in rounds["rounds"]],
        "round_ensembles": [r.get("ensemble") for r in rounds["rounds"]],
        "published": rounds.get("published"),
        "pseudo_templates": rounds.get("pseudo_templates"),
        "pseudo_templates_volume_change": rounds.get("pseudo_templates_volume_change"),
        "pseudo_templates_note": rounds.get("pseudo_templates_note"),
        "boundary_changed": rounds.get("boundary_changed"),
        "pool_dice_per_round": rounds.get("pool_dice_per_round"),
        "children_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "report_files": sorted(f.name for f in report.iterdir()),
    }
    write_result(result, args.out, [
        f"sample-data {sample_seconds:.1f} s + pipeline {pipeline_seconds:.1f} s = {total / 60:.1f} min "
        f"(target {TARGET_SECONDS // 60} min: {'met' if result['within_target'] else 'NOT met'}); stage one {result['stage_one_seconds']} s, "
        f"rounds {result['round_seconds']} s ({result['round_ensembles']})",
        f"pool Dice per round {result['pool_dice_per_round']}; published {result['published']}; "
        f"pseudo-templates {result['pseudo_templates']} (volume change {result['pseudo_templates_volume_change']}); "
        f"peak RSS {result['children_peak_rss_bytes'] / 2**30:.2f} GiB",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
