"""The ``pipeline`` command's jobs over a local datastore: stage one on the pool, then stage two's rounds and their report.

The per-image and pool-wide steps they run live in :mod:`semisam_o1.pool` (the server's jobs run the same ones).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from monailabel.interfaces.datastore import DefaultLabelTag

from semisam_o1.config import AppConfig
from semisam_o1.pool import (
    build_stage_one,
    open_datastore,
    pool_runner,
    readable_pool,
    record_unreadable,
    refresh_pseudo_labels,
    save_published_labels,
)
from semisam_o1.templates import find_templates, label_map


def first_label_advice(studies: Path, config: AppConfig) -> str | None:
    """With no ``final`` label in the datastore: which image to annotate first (the ``representative``
    strategy's pick, :mod:`semisam_o1.representative`) as one sentence; ``None`` once a label exists."""
    from semisam_o1.representative import most_representative

    datastore = open_datastore(Path(studies))
    if find_templates(datastore):
        return None
    paths = {i: Path(datastore.get_image_uri(i)) for i in datastore.list_images()}
    ranked = most_representative(paths, build_stage_one(Path(studies), config).cache.plan.modality)
    if not ranked:
        return None
    best, cost = ranked[0]
    return (f"annotate {best} first: it is the pool's most representative image (mean aligned distance {cost:.3f} to the "
            f"{len(ranked)} image(s) of the pool), so the best single template; save its label as 'final' and run the pipeline again")


def run_stage_one(studies: Path, config: AppConfig, progress: bool = True) -> dict:
    """Pseudo-label every image without a ``final`` label; saved in the datastore under tag ``pseudo``.

    Returns:
        ``{"images": n, "seconds": s, "cases": {image_id: summary}, "errors": {image_id: message}}``, also written to
        ``studies/.semisam/stage1.json``.
    """
    studies = Path(studies)
    datastore = open_datastore(studies)
    templates = find_templates(datastore)
    start = time.perf_counter()
    errors: dict[str, str] = {}
    stage_one = build_stage_one(studies, config)  # the plan is made (and written) here, before any worker reads it
    with pool_runner(studies, config) as runner:
        cases = refresh_pseudo_labels(stage_one, datastore, label_map(templates, config.labels), progress, errors, runner=runner, config=config)
    record_unreadable(studies, "stage_one", errors)
    report = {"images": len(cases), "templates": [t.image_id for t in templates], "seconds": round(time.perf_counter() - start, 1),
              "cases": cases, "errors": errors, "ray_address": config.ray_address}
    (studies / ".semisam").mkdir(exist_ok=True)
    (studies / ".semisam" / "stage1.json").write_text(json.dumps(report, indent=2))
    return report


def run_stage_two(studies: Path, config: AppConfig, truth: Path | None = None, report_dir: Path | None = None, progress: bool = True) -> dict:
    """Stage two's rounds over every image without a ``final`` label, then a report folder.

    Report (``report_dir``, default ``studies/.semisam/report``): ``rounds.json`` (per-round stats and,
    with ``truth``, pool Dice per round), ``dice_per_round.png`` (with ``truth``) and
    ``overlay_<case>.png`` for the first three cases (image, final pseudo-label, uncertainty), and ``label_curve.png`` once
    clinicians' labels have measured two label counts (:mod:`semisam_o1.label_curve`).
    """
    from semisam_o1.evaluation import mean_dice, scores
    from semisam_o1 import label_curve
    from semisam_o1.report import curve_plot, dice_per_round_plot, overlay
    from semisam_o1.stage_two.rounds import StageTwo
    from semisam_o1.volumes import load_image, load_label, load_map

    studies = Path(studies)
    datastore = open_datastore(studies)
    templates = find_templates(datastore)
    stage_one = build_stage_one(studies, config)
    two = StageTwo(studies, stage_one, config.stage_two_params())
    pool, skipped = readable_pool({i: Path(datastore.get_image_uri(i)) for i in sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))})
    record_unreadable(studies, "training", skipped)
    state = two.run(templates, pool, progress=progress)
    rounds, published = len(state["rounds"]), save_published_labels(datastore, two, state, pool)

    report_dir = Path(report_dir or studies / ".semisam" / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    report = {**StageTwo.summary(state), "skipped": skipped}
    names = label_map(templates, config.labels)
    if truth is not None:
        per_round = []
        for r in range(rounds + 1):
            per_case = []
            for image_id, path in pool.items():
                truth_path = Path(truth) / path.name
                if truth_path.exists():
                    image = load_image(path)
                    per_case.append(scores(load_label(two.labels_dir(r) / f"{image_id}.nii.gz", image, require_foreground=False), load_label(truth_path, image), names))
            per_round.append(mean_dice(per_case) if per_case else None)
        report["pool_dice_per_round"] = per_round
        if per_round and per_round[0] is not None:
            dice_per_round_plot(per_round, report_dir / "dice_per_round.png")
    for image_id, path in list(pool.items())[:3]:
        image = load_image(path)
        label = load_label(two.labels_dir(published) / f"{image_id}.nii.gz", image, require_foreground=False)
        entropy = load_map(two.work / f"round_{published}" / "uncertainty" / f"{image_id}.nii.gz")
        overlay(image.array, label, entropy, report_dir / f"overlay_{image_id}.png", title=f"{image_id}: round {published} pseudo-label and uncertainty")
    curve = label_curve.summary(studies)
    if len(curve["points"]) >= 2:  # what each label bought so far, measured on the images clinicians labelled
        report["label_curve"] = curve
        curve_plot({"pseudo-label vs the clinician's label": {p["labels"]: p["dice"] for p in curve["points"]}}, report_dir / "label_curve.png",
                   "real labels", "Dice", "what each label bought (semisam_o1.label_curve)")
    (report_dir / "rounds.json").write_text(json.dumps(report, indent=2))
    return report


def export_bundle(studies: Path, config: AppConfig, out: Path) -> Path:
    """The datastore's published stage-two network as a MONAI Bundle in the folder ``out``, as the server started with
    ``config`` on ``studies`` serves it (its label map, inference patch and the plan's modality).

    Raises:
        NothingPublished: no network is published in ``studies`` yet.
    """
    from semisam_o1.stage_two.export import NothingPublished
    from semisam_o1.stage_two.rounds import StageTwo

    studies = Path(studies)
    if not (studies / ".semisam" / "stage2" / "model.pt").exists():  # StageTwo's model_path; checked before planning anything
        raise NothingPublished()
    two = StageTwo(studies, build_stage_one(studies, config), config.stage_two_params())
    return two.export_bundle(Path(out), label_map(find_templates(open_datastore(studies)), config.labels))
