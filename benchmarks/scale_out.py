"""Scale-out benchmark: stage one's pool-wide work in process vs on Ray (``local``, 1 and 2 workers).

    python benchmarks/scale_out.py [--limit N] [--modes in_process,ray_1,ray_2] [--conf KEY VALUE ...]

For each mode a fresh datastore of the hippocampus template + the first ``--limit`` pool volumes is
built under ``benchmarks/out/scale_out/<mode>`` and the app's own pool steps run on it, as the server
and ``pipeline`` run them: :func:`~semisam_o1.pool.prepare_pool` (features + registrations of
every image, the ``features`` job) then :func:`~semisam_o1.pool.refresh_pseudo_labels` (stage-one
pseudo-labels). Reports wall seconds of each step, Ray's start-up, the speedup of 2 workers over the
in-process run, the per-task overhead (2 single-thread workers vs one process using the same cores,
per task, start-up excluded), the slowdown of 1 worker (1 CPU) and whether every mode's labels are
identical (features: largest difference, float16 rounding expected).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
from common import build_datastore, parser, source_or_exit, write_result
from semisam_o1.config import AppConfig
from semisam_o1.distributed import PoolRunner
from semisam_o1.pool import build_stage_one, open_datastore, prepare_pool, refresh_pseudo_labels
from semisam_o1.templates import find_templates, label_map


def run_mode(mode: str, root, source, args, conf: dict) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    studies, pool = build_datastore(root, source, args.template, args.limit)
    config = AppConfig.from_conf({**conf, "ray_address": "" if mode == "in_process" else "local", "workers": mode.split("_")[-1] if mode != "in_process" else "2"})
    stage_one = build_stage_one(studies, config)
    datastore = open_datastore(studies)
    start = time.perf_counter()
    runner = PoolRunner(config.ray_address, config.workers)
    runner.check_shared_path(studies)
    started = time.perf_counter() - start
    try:
        t0 = time.perf_counter()
        done, failed = prepare_pool(stage_one, datastore, runner, config, progress=True)
        t1 = time.perf_counter()
        cases = refresh_pseudo_labels(stage_one, datastore, label_map(find_templates(datastore), config.labels), progress=True, runner=runner, config=config)
        t2 = time.perf_counter()
    finally:
        runner.close()
    return {"studies": studies, "pool": pool, "ray_start_seconds": round(started, 1), "features_seconds": round(t1 - t0, 1),
            "pseudo_label_seconds": round(t2 - t1, 1), "seconds": round(time.perf_counter() - start, 1),
            "images": len(done), "failed": failed, "labelled": len(cases)}


def compare(a: dict, b: dict) -> dict:
    """Labels identical? Largest feature difference between two modes' datastores."""
    same = True
    for case in a["pool"]:
        la, lb = (r["studies"] / "labels" / "pseudo" / f"{case}.nii.gz" for r in (a, b))
        same &= bool(np.array_equal(_raw(la), _raw(lb)))
    worst = 0.0
    for path in (a["studies"] / ".semisam" / "features").rglob("*.npy"):
        other = b["studies"] / path.relative_to(a["studies"])
        worst = max(worst, float(np.abs(np.load(path).astype(np.float32) - np.load(other).astype(np.float32)).max()))
    return {"labels_identical": same, "features_max_abs_difference": worst}


def _raw(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def main(argv=None) -> int:
    p = parser(__doc__, "scale_out", test_split=False)
    p.add_argument("--limit", type=int, default=16, help="pool volumes (the first N after the template)")
    p.add_argument("--modes", default="in_process,ray_1,ray_2")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = p.parse_args(argv)
    source = source_or_exit()
    conf = {"labels": "anterior=1,posterior=2", **dict(args.conf)}
    runs = {}
    for mode in args.modes.split(","):
        print(f"== {mode}")
        runs[mode] = run_mode(mode, args.work / "scale_out" / mode, source, args, conf)
        print({k: v for k, v in runs[mode].items() if k not in ("studies", "pool")})
    base = runs.get("in_process")
    checks = {m: compare(base, r) for m, r in runs.items() if base and m != "in_process"}
    tasks = 2 * (args.limit + 1)  # one features task per image, one pseudo-label task per pool image (+ the first template's)
    result = {
        "dataset": "hippocampus", "pool_size": args.limit, "conf": conf, "tasks": tasks,
        "runs": {m: {k: v for k, v in r.items() if k not in ("studies", "pool")} for m, r in runs.items()},
        "seconds_in_process": base and base["seconds"],
        "seconds_ray_1_worker": runs.get("ray_1", {}).get("seconds"),
        "seconds_ray_2_workers": runs.get("ray_2", {}).get("seconds"),
        "checks": checks,
        "outputs_identical": bool(checks) and all(c["labels_identical"] for c in checks.values()),
    }
    if base and "ray_2" in runs:
        result["speedup_2_workers"] = round(base["seconds"] / runs["ray_2"]["seconds"], 3)
    if base and "ray_2" in runs:  # the same cores as in process (2 single-thread workers vs one 2-thread process)
        result["overhead_seconds_per_task_2_workers"] = round((runs["ray_2"]["seconds"] - runs["ray_2"]["ray_start_seconds"] - base["seconds"]) / tasks, 3)
    if base and "ray_1" in runs:  # 1 worker = 1 CPU: slower by the threads it does not use, not by Ray
        result["slowdown_1_worker"] = round(runs["ray_1"]["seconds"] / base["seconds"], 3)
    write_result(result, args.out, [
        f"pool {args.limit}: in process {result['seconds_in_process']} s, Ray 1 worker {result['seconds_ray_1_worker']} s, "
        f"2 workers {result['seconds_ray_2_workers']} s (speedup {result.get('speedup_2_workers')}); labels identical: {result['outputs_identical']}",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
