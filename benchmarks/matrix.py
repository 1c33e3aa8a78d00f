"""The benchmark matrix: stage one from three templates per dataset, against ANTs SyN and the registration-only warp.

    python benchmarks/matrix.py --dataset all          # hippocampus, kbp_ct, la, chaos, one after the other
    python benchmarks/matrix.py --dataset la --resume  # skip the cases the JSON already has
    python benchmarks/matrix.py --quick                # hippocampus, 3 targets per template (a smoke run)

Per dataset (``../shared/data/{hippocampus,la,chaos-t2,kbp-ct}``) three templates: the suggested one
(hippocampus ``hippocampus_001`` as ``stage1.py``; LA ``06SR5RBREL16DQ6M8LWS``; CHAOS the first sorted
id as ``chaos.py``; KBP CT ``kbp_pt_4``) and two drawn by ``numpy.random.default_rng(0)`` from the other
ids. For each template the pool is the other ids (sorted) cut to ``--limit`` targets (9; hippocampus 15),
and on every target, in one run: stage one with today's default settings (``--conf`` changes them), the
ANTs SyN single-atlas peer (:func:`atlas_bench.ants_syn`, in a separate worker process so its memory is
not in the peak RSS below) and the registration-only warp (our affine + demons, the transform stage one
cached). Per-class Dice of each, seconds per volume of stage one (from cached features, its
registrations included) and of SyN, feature extraction seconds per volume.

One work datastore per dataset (``--work``, default ``/tmp/semisam-matrix/<dataset>``) holds every image
of the dataset: features are extracted once per image (their PCA basis fitted on the suggested template,
encoded first) and registrations cached per image pair, for all three templates. The main process does
the extraction and stage one and nothing else heavy: its peak RSS is ``extraction_stage1_peak_rss_bytes``.

Writes ``benchmarks/results/matrix_<dataset>.json`` after every case (``"complete": false`` until all
templates' pools are done); ``--resume`` keeps the cases already measured. Two processes may share one
dataset (the second, and any restarted one, with ``--resume``): each claims a case before measuring it
(``<work>/.matrix_claims/``, with its process id; a dead process's claim is taken over) and merges its rows
into the JSON under a file lock, so they split the cases between them. ``--stage2`` then runs stage
two per template on its pool (:func:`atlas_bench.stage_two_result`; ``final_dice_mean``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from atlas_bench import (
    Extraction,
    copy_images,
    mean_over,
    registration_only,
    stage_one_columns,
    stage_two_result,
    timed_ants_syn,
)
from common import RESULTS, machine, peak_rss_bytes
from filelock import FileLock
from semisam_o1 import PROJECT_ROOT
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one
from semisam_o1.stage_one.plan import resolve_device
from semisam_o1.stage_one.registration import read_image
from semisam_o1.templates import Template
from semisam_o1.volumes import load_image, load_label

DATA = PROJECT_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Dataset:
    folder: str
    classes: dict
    suggested: str | None  # None: the first sorted id
    limit: int  # targets per template


DATASETS = {
    "hippocampus": Dataset("hippocampus", {"anterior": 1, "posterior": 2}, "hippocampus_001", 15),
    "kbp_ct": Dataset("kbp-ct", {"brainstem": 1, "spinal_cord": 2, "right_parotid": 3, "left_parotid": 4, "esophagus": 5, "larynx": 6,
                                 "mandible": 7}, "kbp_pt_4", 9),
    "la": Dataset("la", {"atrium": 1}, "06SR5RBREL16DQ6M8LWS", 9),
    "chaos": Dataset("chaos-t2", {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}, None, 9),
}
#: ``--dataset all``: the cheap one first
ORDER = ("hippocampus", "kbp_ct", "la", "chaos")
METHODS = ("stage1", "ants_syn", "registration_only")


def ids_of(dataset: Dataset) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (DATA / dataset.folder / "images").glob("*.nii.gz"))


def choose_templates(ids: list[str], suggested: str | None, n: int = 3, seed: int = 0) -> list[str]:
    """The suggested template (default the first id), then ``n - 1`` drawn by ``default_rng(seed)`` from the other ids.

    >>> choose_templates([f"c{i}" for i in range(10)], None)
    ['c0', 'c7', 'c6']
    """
    first = suggested or ids[0]
    others = [i for i in ids if i != first]
    drawn = np.random.default_rng(seed).choice(len(others), size=min(n - 1, len(others)), replace=False)
    return [first, *[others[int(i)] for i in drawn]]


def spread(values: list[float]) -> dict | None:
    """Spread of per-template means: std (population), min, max, and the values."""
    if not values:
        return None
    return {"std": round(float(np.std(values)), 4), "min": round(float(min(values)), 4), "max": round(float(max(values)), 4),
            "per_template": [round(float(v), 4) for v in values]}


def complete_row(row: dict, skip_ants: bool) -> bool:
    return "stage1" in row and "registration_only" in row and (skip_ants or "ants_syn" in row)


def summarize(name: str, ds: Dataset, templates: list[str], pools: dict, rows: dict, stage_two: dict, info: dict, args) -> dict:
    """The result JSON from the per-case rows ``{template: {target: row}}``."""
    classes = ds.classes
    per_template, all_rows = [], []
    for t in templates:
        cases = rows.get(t, {})
        entry = {"template": t, "pool": pools[t], "cases_done": len(cases), "complete": len(cases) == len(pools[t])}
        for method in METHODS:
            entry[f"{method}_dice_mean"], entry[f"{method}_dice_per_class"] = mean_over(list(cases.values()), method, classes)
        for key in ("stage1", "ants_syn", "registration"):
            secs = [c[f"{key}_seconds"] for c in cases.values() if f"{key}_seconds" in c and not c.get("timing_invalid")]
            entry[f"{key if key != 'registration' else 'registration_only'}_seconds_per_volume"] = round(float(np.mean(secs)), 2) if secs else None
        entry["stage1_fallbacks"] = {n: sum(n in c.get("stage1_fallback", []) for c in cases.values()) for n in classes}
        if t in stage_two:
            entry["stage2"] = stage_two[t]
            entry["final_dice_mean"] = stage_two[t].get("final_dice")
        entry["per_case"] = cases
        per_template.append(entry)
        all_rows += list(cases.values())
    total = sum(len(pools[t]) for t in templates)
    result: dict = {"dataset": name, "complete": len(all_rows) == total and (not args.stage2 or all(t in stage_two for t in templates)),
                    "cases_done": len(all_rows), "cases_total": total, "templates": templates,
                    "template_choice": {"suggested": templates[0], "drawn": templates[1:], "rng": "numpy default_rng(0) over the other ids"},
                    "pool_per_template": {"targets": len(pools[templates[0]]), "rule": "the other ids, sorted, first N"}, **info}
    for method in METHODS:  # mean over every (template, target) case measured; spread over the per-template means
        mean, by_class = mean_over(all_rows, method, classes)
        result[f"{method}_dice_mean"], result[f"{method}_dice_per_class_mean"] = mean, by_class
        result[f"{method}_dice_spread"] = spread([e[f"{method}_dice_mean"] for e in per_template if e[f"{method}_dice_mean"] is not None])
        result[f"{method}_dice_per_class_spread"] = ({n: spread([e[f"{method}_dice_per_class"][n] for e in per_template if e[f"{method}_dice_per_class"]])
                                                      for n in classes} if by_class else None)
    finals = [stage_two[t]["final_dice"] for t in templates if t in stage_two]
    result["final_dice_mean"] = round(float(np.mean(finals)), 4) if finals else None
    result["final_dice_spread"] = spread(finals)
    for key, out in (("stage1", "stage1"), ("ants_syn", "ants_syn"), ("registration", "registration_only")):
        secs = [r[f"{key}_seconds"] for r in all_rows if f"{key}_seconds" in r and not r.get("timing_invalid")]
        result[f"{out}_seconds_per_volume"] = round(float(np.mean(secs)), 2) if secs else None
    result["stage1_seconds_note"] = ("stage one per target from cached features, registering the template (demons + SyN on the plan's grid) "
                                     "included; the registration-only warp then reads the cached demons transform (registration_only_seconds ~0)")
    result["ants_syn_seconds_note"] = "antspyx SyN at full resolution, one ITK thread (deterministic_ants), in a worker process"
    result["timing_invalid_cases"] = [f"{e['template']}/{c}: {r['timing_invalid']}" for e in per_template for c, r in e["per_case"].items()
                                      if r.get("timing_invalid")]  # left out of the seconds means (their Dice stands)
    result["per_template"] = per_template
    result["machine"] = machine()
    return result


def run_dataset(name: str, args, pool_executor) -> dict:
    ds = DATASETS[name]
    ids = ids_of(ds)
    templates = choose_templates(ids, ds.suggested, args.templates)
    limit = args.limit or ds.limit
    pools = {t: [i for i in ids if i != t][:limit] for t in templates}
    studies = (args.work or Path("/tmp/semisam-matrix")) / name
    copy_images(DATA / ds.folder / "images", studies, ids)  # every image: the plan sees the whole datastore, as the app would
    labels = DATA / ds.folder / "labels"
    conf = {"labels": ",".join(f"{n}={v}" for n, v in ds.classes.items()), **dict(args.conf)}
    config = AppConfig.from_conf(conf)
    stage_one = build_stage_one(studies, config)
    plan = stage_one.cache.plan
    print(f"== {name}: templates {templates}; {limit} targets each; modality {plan.modality} "
          f"({'--conf' if config.modality != 'auto' else 'detected'}: {plan.planned_from.get('modality_evidence')}); "
          f"features {stage_one.cache.settings_id}", flush=True)
    features = Extraction(studies, stage_one.cache, conf, child=False, timing_name=f"extraction_timing_{stage_one.cache.settings_id}.json")
    suffix = "" if not args.tag else f"_{args.tag}"
    out = args.out or RESULTS / f"matrix_{name}{suffix}.json"
    rows: dict = {t: {} for t in templates}
    stage_two: dict = {}
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        for entry in previous.get("per_template", []):
            if entry["template"] in rows:
                rows[entry["template"]] = {c: r for c, r in entry["per_case"].items() if c in pools[entry["template"]] and complete_row(r, args.skip_ants)}
                if "stage2" in entry:
                    stage_two[entry["template"]] = entry["stage2"]
    ants_peak = [None]
    lock = FileLock(str(out) + ".lock")
    claims = studies / ".matrix_claims" / out.stem
    claims.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        out.unlink(missing_ok=True)

    def merge_from_disk() -> dict:
        """Rows another process on this output wrote (complete rows of this run's templates and pools); its info."""
        if not out.exists():
            return {}
        on_disk = json.loads(out.read_text())
        for entry in on_disk.get("per_template", []):
            t = entry["template"]
            if t in rows:
                for c, r in entry["per_case"].items():
                    if c in pools[t] and c not in rows[t] and complete_row(r, args.skip_ants):
                        rows[t][c] = r
                    elif c in rows[t] and r.get("timing_invalid"):  # flagged on disk (--invalid-timing) after this process measured it
                        rows[t][c]["timing_invalid"] = r["timing_invalid"]
                if "stage2" in entry and t not in stage_two:
                    stage_two[t] = entry["stage2"]
        return on_disk

    def claim(t: str, case: str) -> bool:
        """Take ``case`` of template ``t`` unless a live process has claimed it."""
        path = claims / f"{t}__{case}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
                os.kill(owner, 0)  # alive?
                if owner != os.getpid():
                    return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass  # a dead process's claim
            path.write_text(str(os.getpid()))
            return True
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def info() -> dict:
        return {"modality": plan.modality, "modality_source": "conf" if config.modality != "auto" else "detected",
                "modality_evidence": plan.planned_from.get("modality_evidence"), "feature_settings": stage_one.cache.settings_id,
                "feature_basis_fitted_on": templates[0], "conf": dict(args.conf), "registration": config.stage_one_params().registration,
                "device": resolve_device(config.device), **features.summary(),
                "extraction_stage1_peak_rss_bytes": peak_rss_bytes(), "ants_syn_process_peak_rss_bytes": ants_peak[0],
                "note": args.note}

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with lock:
            on_disk = merge_from_disk()
            now = info()
            for key in ("extraction_stage1_peak_rss_bytes", "ants_syn_process_peak_rss_bytes"):  # the largest of the processes
                now[key] = max([v for v in (now[key], on_disk.get(key)) if v is not None], default=None)
            result = summarize(name, ds, templates, pools, rows, stage_two, now, args)
            tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, out)

    if args.invalid_timing:  # flag measured cases whose seconds are not the work's (e.g. the process was stopped meanwhile); no measuring
        with lock:
            merge_from_disk()
        for spec in args.invalid_timing:
            case_id, _, reason = spec.partition(":")
            t, _, case = case_id.partition("/")
            rows[t][case]["timing_invalid"] = reason or "flagged"
        write()
        return json.loads(out.read_text())
    features(templates[0])  # the feature basis is fitted on the first image encoded: the suggested template
    total = sum(len(p) for p in pools.values())
    done = sum(len(r) for r in rows.values())
    for t in templates:
        template = Template(t, studies / f"{t}.nii.gz", labels / f"{t}.nii.gz")
        label_itk = read_image(template.label_path)
        features(t)
        for case in pools[t]:
            with lock:
                merge_from_disk()
            if case in rows[t] or not claim(t, case):
                continue
            start = time.perf_counter()
            path = studies / f"{case}.nii.gz"
            features(case)
            truth = load_label(labels / f"{case}.nii.gz", load_image(path))
            row = stage_one_columns(stage_one, path, [template], truth, ds.classes, "stage1")
            row.update(registration_only(stage_one, path, template.image_path, label_itk, truth, ds.classes))
            if not args.skip_ants:
                syn = pool_executor.submit(timed_ants_syn, path, template.image_path, template.label_path, truth, ds.classes).result()
                ants_peak[0] = max(ants_peak[0] or 0, syn.pop("ants_process_peak_rss_bytes"))
                row.update(syn)
            rows[t][case] = row
            write()
            (claims / f"{t}__{case}").unlink(missing_ok=True)
            done = sum(len(r) for r in rows.values())
            brief = {m: round(float(np.mean(list(row[m].values()))), 4) for m in METHODS if m in row}
            syn_seconds = f", SyN {row['ants_syn_seconds']} s" if "ants_syn_seconds" in row else ""
            print(f"[{name} {done}/{total}] template {t} -> {case}: {json.dumps(brief)} stage1 {row['stage1_seconds']} s{syn_seconds}; "
                  f"case {time.perf_counter() - start:.0f} s", flush=True)
    if args.stage2:
        for t in templates:
            if t in stage_two or not claim(t, "stage2"):
                continue
            template = Template(t, studies / f"{t}.nii.gz", labels / f"{t}.nii.gz")
            result = stage_two_result(studies, stage_one, config, [template], {c: studies / f"{c}.nii.gz" for c in pools[t]}, labels,
                                      ds.classes, args.seed)
            stage_two[t] = {k: v for k, v in result.items() if k in ("final_dice", "final_dice_per_class", "stage2_per_round", "stage2_published",
                                                                    "stage2_seconds", "stage2_process_peak_rss_bytes", "stage2_params")}
            write()
    write()
    result = json.loads(out.read_text())
    print(f"== {name} ({result['cases_done']}/{result['cases_total']} cases) -> {out}")
    for method in METHODS:
        print(f"  {method:18s} {result[f'{method}_dice_mean']}  {json.dumps(result[f'{method}_dice_per_class_mean'])}  "
              f"spread {json.dumps((result[f'{method}_dice_spread'] or {}).get('per_template'))}")
    print(f"  stage1 {result['stage1_seconds_per_volume']} s/volume, SyN {result['ants_syn_seconds_per_volume']} s/volume, "
          f"extraction {result['extraction_seconds_per_volume']} s/volume; peak RSS {result['extraction_stage1_peak_rss_bytes'] / 2**30:.2f} GiB",
          flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=[*ORDER, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="hippocampus only, 3 targets per template (results tagged _quick)")
    p.add_argument("--templates", type=int, default=3, help="the suggested template and N-1 drawn (default 3)")
    p.add_argument("--limit", type=int, default=None, help="targets per template (default: 15 hippocampus, else 9)")
    p.add_argument("--work", type=Path, default=None, help="parent of the per-dataset work datastores (default /tmp/semisam-matrix)")
    p.add_argument("--out", type=Path, default=None, help="output JSON (one dataset only)")
    p.add_argument("--tag", default="", help="suffix of the output name: matrix_<dataset>_<tag>.json")
    p.add_argument("--resume", action="store_true", help="keep the cases the output JSON already has")
    p.add_argument("--skip-ants", action="store_true", help="no ANTs SyN peer (not a quality benchmark then: for ablations only)")
    p.add_argument("--stage2", action="store_true", help="then stage two per template on its pool (final_dice_mean; "
                   "one process per work datastore: stage two's work folder is shared)")
    p.add_argument("--seed", type=int, default=0, help="with --stage2: training seed")
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--invalid-timing", action="append", default=[], metavar="TEMPLATE/CASE[:REASON]",
                   help="only flag this measured case's seconds as invalid (left out of the seconds means; with --resume), then exit")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.limit, args.tag = "hippocampus", args.limit or 3, args.tag or "quick"
    names = ORDER if args.dataset == "all" else (args.dataset,)
    if args.out and len(names) > 1:
        p.error("--out needs one --dataset")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ants_worker:
        for name in names:
            run_dataset(name, args, ants_worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
