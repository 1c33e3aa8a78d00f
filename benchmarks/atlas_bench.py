"""Stage one against single-atlas registration on a labelled dataset (shared by ``la.py`` and ``chaos.py``).

One template (its label the datastore's only ``final`` label), the other volumes the pool. On the
same cases, in one run: stage one (:class:`~semisam_o1.stage_one.predictor.StageOne`, each registration
method of :data:`~semisam_o1.choices.REGISTRATIONS` and all of them voting together; Dice before and after the safety floor),
the registration-only warp of the template label (our affine + demons), and ANTs SyN single-atlas
(``ants.registration(type_of_transform="SyN")`` at full resolution, template label warped nearest
neighbour); seconds per volume of each, feature extraction cost. The JSON is rewritten after every
case (``"complete": false`` until the pool is done), so an interrupted run leaves its partial numbers.

With ``--stage2`` (after the stage-one cases; ``--resume`` keeps those already measured) stage two runs
on the whole pool with the app's settings (``--conf rounds R`` etc.): the pool Dice of every round's
pseudo-labels and ``final_dice``, the Dice of the pseudo-labels ``pipeline`` publishes (the round chosen
without ground truth), plus each round's label-free signals and seconds. The pool is its own test set
(stage two is transductive here: it labels the pool, as the app does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, peak_rss_bytes, with_training_seed, write_result
from semisam_o1.choices import REGISTRATIONS, SIGNALS
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_one.predictor import StageOne
from semisam_o1.stage_one.registration import deterministic_ants, read_image, warp_label
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image, load_label

#: stage one's spatial priors compared (``--conf stage_one.registration``): each method alone, and both voting
PRIORS = (*REGISTRATIONS, "+".join(REGISTRATIONS))

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one
from semisam_o1.volumes import load_image
studies, image, conf = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
stage_one = build_stage_one(studies, AppConfig.from_conf(conf))
start = time.perf_counter()
stage_one.cache.get_or_compute(load_image(image))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = pred == value, truth == value
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / n if n else 1.0


def per_class(pred, truth, classes: dict[str, int]) -> dict[str, float]:
    return {name: round(dice(pred, truth, v), 4) for name, v in classes.items()}


def mean_over(cases: list[dict], key: str, classes: dict[str, int]) -> tuple[float | None, dict[str, float] | None]:
    rows = [c[key] for c in cases if c.get(key) is not None]
    if not rows:
        return None, None
    by_class = {n: round(float(np.mean([r[n] for r in rows])), 4) for n in classes}
    return round(float(np.mean(list(by_class.values()))), 4), by_class


def ants_syn(fixed: Path, template: Path, template_label: Path) -> np.ndarray:
    """ANTs SyN single-atlas: the template label warped onto ``fixed`` (nearest neighbour), (D, H, W) uint8.

    Seeded and on one thread (:func:`~semisam_o1.stage_one.registration.deterministic_ants`, seed 1 as
    :func:`~semisam_o1.stage_one.registration.syn_register`), so the peer's Dice is the same in every run; ANTs'
    transform files go to a temporary folder removed afterwards (by default it leaves them in /tmp)."""
    import ants

    with deterministic_ants(seed=1), tempfile.TemporaryDirectory(prefix="semisam-peer-") as tmp:  # ANTs' own files go there
        f, m = ants.image_read(str(fixed)), ants.image_read(str(template))
        reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN", outprefix=str(Path(tmp) / "syn_"))
        warped = ants.apply_transforms(f, ants.image_read(str(template_label)), reg["fwdtransforms"], interpolator="nearestNeighbor")
    return np.rint(warped.numpy()).astype(np.uint8)


def timed_ants_syn(fixed: Path, template: Path, template_label: Path, truth: np.ndarray, classes: dict[str, int]) -> dict:
    """:func:`ants_syn` scored: ``{"ants_syn": per-class Dice, "ants_syn_seconds"}`` (also the task a
    separate process runs, so that ANTs' memory stays out of the caller's peak RSS)."""
    start = time.perf_counter()
    dice_ = per_class(ants_syn(fixed, template, template_label), truth, classes)
    return {"ants_syn": dice_, "ants_syn_seconds": round(time.perf_counter() - start, 2), "ants_process_peak_rss_bytes": peak_rss_bytes()}


def copy_images(images: Path, studies: Path, cases) -> None:
    """The images of ``cases`` copied into the work datastore ``studies`` (once)."""
    studies.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if not (studies / f"{case}.nii.gz").exists():
            shutil.copy(images / f"{case}.nii.gz", studies / f"{case}.nii.gz")


class Extraction:
    """Features of a work datastore's images, per case as a benchmark reaches it (so an interrupted run
    has whole cases), timed. With ``child`` the first cache miss runs in a child process, whose peak RSS
    is one volume's extraction (PCA basis fit included); the others run in this process. Timings are kept
    in ``<studies>/<timing_name>`` for reruns (a cached image is not timed again)."""

    def __init__(self, studies: Path, cache, conf: dict, child: bool = True, timing_name: str = "extraction_timing.json"):
        self.studies, self.cache, self.conf, self.child = studies, cache, conf, child
        self.timing_file = studies / timing_name
        self.timing = json.loads(self.timing_file.read_text()) if self.timing_file.exists() else {"seconds": {}, "peak_rss_bytes": None}

    def __call__(self, case: str) -> None:
        image = load_image(self.studies / f"{case}.nii.gz")
        if self.cache.get(image) is not None:
            return
        if self.child and self.timing["peak_rss_bytes"] is None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            out = subprocess.run([sys.executable, "-c", _CHILD, str(self.studies), str(image.path), json.dumps(self.conf)], env=env,
                                 capture_output=True, text=True, check=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            self.timing["peak_rss_bytes"], self.timing["seconds"][case] = child["peak_rss_bytes"], child["seconds"]
        else:
            start = time.perf_counter()
            self.cache.get_or_compute(image)
            self.timing["seconds"][case] = time.perf_counter() - start
        from filelock import FileLock

        with FileLock(f"{self.timing_file}.lock"):  # another benchmark process on the same work datastore may time other images
            if self.timing_file.exists():
                on_disk = json.loads(self.timing_file.read_text())
                self.timing["seconds"] = {**on_disk["seconds"], **self.timing["seconds"]}
                self.timing["peak_rss_bytes"] = self.timing["peak_rss_bytes"] or on_disk["peak_rss_bytes"]
            tmp = self.timing_file.with_name(f"{self.timing_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.timing))
            os.replace(tmp, self.timing_file)
        print(f"features {case}: {self.timing['seconds'][case]:.1f} s", flush=True)

    def bytes_per_voxel(self, done: list[str]) -> float:
        images = [load_image(self.studies / f"{c}.nii.gz") for c in done]
        return sum(self.cache.path(i.path).stat().st_size for i in images) / sum(i.array.size for i in images)

    def summary(self) -> dict:
        secs = list(self.timing["seconds"].values())
        return {"extraction_seconds_per_volume": round(float(np.mean(secs)), 2) if secs else None, "extraction_volumes_timed": len(secs),
                "extraction_peak_rss_bytes": self.timing["peak_rss_bytes"]}


def stage_one_columns(stage_one: StageOne, path: Path, templates, truth: np.ndarray, classes: dict[str, int], key: str) -> dict:
    """One stage-one prediction of ``path`` scored: ``{key: per-class Dice, key_voted: before the safety floor,
    key_seconds, key_fallback: classes that fell back to the registration, key_floor: the floor's checks}``."""
    start = time.perf_counter()
    prediction = stage_one.predict(path, templates)
    seconds = time.perf_counter() - start
    voted = prediction.voted if prediction.voted is not None else prediction.label
    return {key: per_class(prediction.label, truth, classes), f"{key}_voted": per_class(voted, truth, classes),
            f"{key}_seconds": round(seconds, 2), f"{key}_fallback": [nm for nm, v in classes.items() if v in prediction.fallback_values],
            f"{key}_floor": {nm: prediction.floor.get(v) for nm, v in classes.items()}}


def registration_only(demons: StageOne, path: Path, template_path: Path, label_itk, truth: np.ndarray, classes: dict[str, int]) -> dict:
    """The registration-only peer: the template label warped by our affine + demons registration (the transform
    stage one caches; registered now if it is not cached): ``{"registration_only": per-class Dice, "registration_seconds"}``."""
    start = time.perf_counter()
    transform = demons.transform(path, template_path, "demons")
    seconds = round(time.perf_counter() - start, 2)
    return {"registration_only": per_class(warp_label(label_itk, read_image(path), transform), truth, classes), "registration_seconds": seconds}


def run(name: str, images: Path, labels: Path, template: str, classes: dict[str, int], args) -> int:
    ids = sorted(p.name[: -len(".nii.gz")] for p in images.glob("*.nii.gz"))
    pool = [i for i in ids if i != template][: args.limit]
    studies = args.work
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    copy_images(images, studies, [template, *pool])
    shutil.copy(labels / f"{template}.nii.gz", studies / "labels" / "final" / f"{template}.nii.gz")
    conf = {"labels": ",".join(f"{n}={v}" for n, v in classes.items()), **dict(args.conf)}
    config = AppConfig.from_conf(conf)
    base = build_stage_one(studies, config)
    stage_ones = {m: StageOne(studies, base.cache, label_names=config.labels, registration=m, params=base.params) for m in PRIORS}
    default = config.stage_one_params().registration
    templates = find_templates(open_datastore(studies))
    template_path, template_label = templates[0].image_path, templates[0].label_path

    # features, per case as the loop reaches it; the first cache miss in a child process (its peak RSS)
    features = Extraction(studies, base.cache, conf)
    features(template)
    cases = {}
    out_path = args.out or RESULTS / f"{name}.json"
    reuse = {}
    if args.reuse_ants and out_path.exists():
        reuse = {c: r for c, r in json.loads(out_path.read_text()).get("per_case", {}).items() if "ants_syn" in r}
    pool_size = len(pool)
    pool = pool[: args.stop_after] if args.stop_after else pool
    label_itk = read_image(template_label)
    previous = json.loads(out_path.read_text()).get("per_case", {}) if args.resume and out_path.exists() else {}
    for n, case in enumerate(pool):
        path = studies / f"{case}.nii.gz"
        if all(f"stage1_{m}" in previous.get(case, {}) for m in PRIORS) and "ants_syn" in previous[case]:
            cases[case] = previous[case]  # --resume: a case the same code already measured completely
            continue
        features(case)
        truth = load_label(labels / f"{case}.nii.gz", load_image(path))
        # registration-only: our affine + demons (the transform stage one's default caches), label warped
        cached = stage_ones["demons"].registration_path(path, template_path).exists()
        row: dict = registration_only(stage_ones["demons"], path, template_path, label_itk, truth, classes)
        if cached and case in reuse:  # the registration's own cost, from the run that computed it
            row["registration_seconds"] = reuse[case]["registration_seconds"]
            for method in PRIORS:  # stage one's seconds when it registered (not from cache)
                first = reuse[case].get(f"stage1_{method}_seconds_first_run", reuse[case].get(f"stage1_{method}_seconds"))
                if first is not None:
                    row[f"stage1_{method}_seconds_first_run"] = first
        if case in reuse:  # ANTs SyN does not depend on this project's code: its numbers from the previous run
            row["ants_syn"], row["ants_syn_seconds"] = reuse[case]["ants_syn"], reuse[case]["ants_syn_seconds"]
        elif not args.skip_ants:
            syn = timed_ants_syn(path, template_path, template_label, truth, classes)
            row["ants_syn"], row["ants_syn_seconds"] = syn["ants_syn"], syn["ants_syn_seconds"]
        for method, stage_one in stage_ones.items():
            row.update(stage_one_columns(stage_one, path, templates, truth, classes, f"stage1_{method}"))
        cases[case] = row
        print(f"[{n + 1}/{len(pool)}] {case}: " + json.dumps({k: v for k, v in row.items() if not k.endswith("_floor")}), flush=True)
        write(name, cases, classes, default, features, features.bytes_per_voxel([template, *cases]), args, template, pool_size)
    stage_two = stage_two_result(studies, base, config, templates, {c: studies / f"{c}.nii.gz" for c in pool}, labels, classes,
                                 args.seed) if args.stage2 else None
    if cases:  # (a resumed run may have measured nothing new)
        write(name, cases, classes, default, features, features.bytes_per_voxel([template, *cases]), args, template, pool_size, stage_two)
    return 0


def stage_two_result(studies: Path, stage_one: StageOne, config: AppConfig, templates, pool: dict[str, Path], labels: Path,
                     classes: dict[str, int], seed: int = 0) -> dict:
    """Stage two from scratch on ``pool`` (every network trained with ``seed``); per round the mean pool Dice of its
    pseudo-labels (per class)."""
    work = studies / ".semisam" / "bench-stage2"
    if work.exists():
        shutil.rmtree(work)
    two = StageTwo(studies, stage_one, with_training_seed(config.stage_two_params(), seed), work=work)
    start = time.perf_counter()
    state = two.run(templates, pool, progress=True)
    seconds = time.perf_counter() - start
    per_round = []
    for r in range(len(state["rounds"]) + 1):
        rows = []
        for case, path in pool.items():
            image = load_image(path)
            label = load_label(two.labels_dir(r) / f"{case}.nii.gz", image, require_foreground=False)
            rows.append({"pool": per_class(label, load_label(labels / f"{case}.nii.gz", image), classes)})
        mean, by_class = mean_over(rows, "pool", classes)
        entry = {"round": r, "pool_dice": mean, "pool_dice_per_class": by_class}
        if r:
            entry.update({k: state["rounds"][r - 1].get(k) for k in ("seconds", *SIGNALS, "mean_entropy", "uncertain_voxels",
                                                                    "returned_to_stage_one", "ensemble", "replace_confidence",
                                                                    "kept_previous_fraction", "network_volume_ratio", "network_volume_change")})
        per_round.append(entry)
        print("stage 2", json.dumps(entry), flush=True)
    published = StageTwo.published(state)
    # which round each label-free signal would publish, and that round's pool Dice (never used to choose)
    chosen_by = {name: {"round": best["round"], "pool_dice": best["pool_dice"]} for name, sign in SIGNALS.items()
                 for best in [max(per_round[1:], key=lambda e: sign * (e.get(name) if e.get(name) is not None else -np.inf))]}
    return {"stage2_round_chosen_by": chosen_by, "stage2_process_peak_rss_bytes": peak_rss_bytes(), "final_dice": per_round[published]["pool_dice"], "final_dice_per_class": per_round[published]["pool_dice_per_class"],
            "stage2_per_round": per_round, "stage2_published": state.get("published"), "stage2_stopped_early": state.get("stopped_early"),
            "stage2_pseudo_templates": state.get("pseudo_templates", []),
            "stage2_pseudo_templates_volume_change": state.get("pseudo_templates_volume_change"),
            "stage2_pseudo_templates_note": state.get("pseudo_templates_note"), "stage2_boundary_changed": state.get("boundary_changed"),
            "stage2_seconds": round(seconds, 1),
            "stage2_params": {"rounds": config.rounds, "iterations": two.params.train.iterations, "publish": two.params.publish,
                              "pseudo_templates": two.params.pseudo_templates, "boundary": two.params.boundary,
                              "network_voxels": two.params.network_voxels, "real_share": two.params.real_share,
                              "warm_start": two.params.warm_start, "warm_lr": two.params.warm_lr, "seed": seed}}


def write(name, cases, classes, default, features: Extraction, cache_bytes_per_voxel, args, template, pool_size, stage_two=None) -> None:
    rows = list(cases.values())
    result: dict = {"complete": len(rows) == pool_size, "cases_done": len(rows), "pool_size": pool_size, "template": template,
                    "default_registration": default, "conf": dict(args.conf)}
    for method in PRIORS:
        for suffix in ("", "_voted"):
            m, pc = mean_over(rows, f"stage1_{method}{suffix}", classes)
            result[f"stage1_{method}{suffix}_dice"], result[f"stage1_{method}{suffix}_dice_per_class"] = m, pc
        result[f"stage1_{method}_seconds_per_volume"] = round(float(np.mean([r[f"stage1_{method}_seconds"] for r in rows])), 2)
        first = [r.get(f"stage1_{method}_seconds_first_run", r[f"stage1_{method}_seconds"]) for r in rows]
        result[f"stage1_{method}_seconds_per_volume_with_registration"] = round(float(np.mean(first)), 2)
        result[f"stage1_{method}_fallbacks"] = {n: sum(n in r[f"stage1_{method}_fallback"] for r in rows) for n in classes}
    result["stage1_dice"], result["stage1_dice_per_class"] = result[f"stage1_{default}_dice"], result[f"stage1_{default}_dice_per_class"]
    result["ants_syn_dice"], result["ants_syn_dice_per_class"] = mean_over(rows, "ants_syn", classes)
    result["ants_syn_seconds_per_volume"] = round(float(np.mean([r["ants_syn_seconds"] for r in rows])), 2) if rows and "ants_syn_seconds" in rows[0] else None
    result["registration_only_dice"], result["registration_only_dice_per_class"] = mean_over(rows, "registration_only", classes)
    result["registration_only_seconds_per_volume"] = round(float(np.mean([r["registration_seconds"] for r in rows])), 2)
    out_path = args.out or RESULTS / f"{name}.json"
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if stage_two is None and args.resume and previous.get("final_dice") is not None:  # keep the last stage-two measurement
        stage_two = {k: v for k, v in previous.items() if k.startswith(("final_dice", "stage2_"))}
    result["final_dice"] = None  # (no --stage2 run)
    result.update(stage_two or {})
    result.update(features.summary())
    result["cache_bytes_per_voxel"] = round(cache_bytes_per_voxel, 3)
    result["device"] = "cpu"
    # a stage-two round on this pool is measured by scale.py (LA: its 19-volume pool, each step in its own process)
    rounds = json.loads((RESULTS / "scale.json").read_text()).get("stage_two_round", {}) if name == "la" and (RESULTS / "scale.json").exists() else {}
    largest = max(rounds, key=int) if rounds else None
    result["stage_two_round_peak_rss_bytes"] = rounds[largest]["peak_rss_bytes"] if largest else None
    result["stage_two_round_source"] = f"benchmarks/results/scale.json, pool of {largest}" if largest else None
    result["per_case"] = cases
    lines = [f"{name}: {len(rows)}/{pool_size} cases"]
    for key in ["stage1", *[f"stage1_{m}" for m in PRIORS], *[f"stage1_{m}_voted" for m in PRIORS], "ants_syn", "registration_only"]:
        lines.append(f"  {key:22s} {result[key + '_dice']}  {json.dumps(result[key + '_dice_per_class'])}")
    if result["final_dice"] is not None:
        lines.append(f"  stage two final        {result['final_dice']}  {json.dumps(result['final_dice_per_class'])}  "
                     f"(round {result['stage2_published']['round'] if result['stage2_published'] else 0}; pool Dice per round "
                     f"{[r['pool_dice'] for r in result['stage2_per_round']]})")
    write_result(result, out_path, lines)


def parser(doc: str, name: str, limit: int | None = None):
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/semisam-bench") / name, help="datastore (features, registrations cached)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--limit", type=int, default=limit, help="only the first N pool volumes (sorted ids)")
    p.add_argument("--skip-ants", action="store_true")
    p.add_argument("--reuse-ants", action="store_true", help="take ANTs SyN numbers of cases already in the output JSON (same cases, same data)")
    p.add_argument("--resume", action="store_true", help="keep the cases of the output JSON that have every column (same data, same code)")
    p.add_argument("--stop-after", type=int, default=None, help="evaluate only the first N cases of the pool (the pool size reported stays --limit)")
    p.add_argument("--stage2", action="store_true", help="then run stage two on the pool (final_dice)")
    p.add_argument("--seed", type=int, default=0, help="with --stage2: training seed of every round's network (repeat with others to measure the spread)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    return p
