"""Command-line pipeline over a local datastore: stage one (and later stage two), with progress bars."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from tqdm import tqdm

from semisam_o1.config import AppConfig
from semisam_o1.feature_cache import FeatureCache
from semisam_o1.plan import load_or_make_plan, resolve_device
from semisam_o1.stage_one import NoTemplateError, StageOne
from semisam_o1.tasks.pseudo_labels import PSEUDO_TAG
from semisam_o1.templates import find_templates, label_map
from semisam_o1.volumes import InputError, save_label

logger = logging.getLogger(__name__)


def open_datastore(studies: Path) -> LocalDatastore:
    """MONAI Label's own local datastore over ``studies`` (no file watching)."""
    return LocalDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)


def build_stage_one(studies: Path, config: AppConfig) -> StageOne:
    """Stage one over ``studies`` with the datastore's plan (read, or planned now from its images and written)."""
    device = resolve_device(config.device)
    overrides = {"encoder_image_size": config.encoder_image_size, "feature_stride": config.feature_stride}
    images = sorted(p for ext in ("*.nii.gz", "*.nii") for p in Path(studies).glob(ext))
    plan = load_or_make_plan(studies, images, device, overrides)
    cache = FeatureCache(studies, config.encoder_spec(plan.encoder_image_size), config.feature_dims, config.modality, plan, device)
    return StageOne(studies, cache, label_values=set(config.labels.values()) or None, label_names=config.labels,
                    registration=config.registration, propagation=config.propagation)


def refresh_pseudo_labels(stage_one: StageOne, datastore: Datastore, names: dict[str, int], progress: bool = False,
                          errors: dict[str, str] | None = None, before_image=None) -> dict:
    """Stage one from the datastore's current templates on every image without a ``final`` label.

    Saves each result under tag ``pseudo`` (never ``final``) with its summary as label info.
    Returns ``{image_id: summary}``; an image that fails (bad file, failed registration) is logged,
    its message put in ``errors[image_id]`` (when given), and skipped: the rest of the pool goes on.
    ``before_image()`` is called before each image (the server's refresh waits there while an
    interactive request runs, :mod:`semisam_o1.priority`).
    """
    templates = find_templates(datastore)
    cases = {}
    for image_id in tqdm(sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL)), desc="stage 1: propagate", unit="image", disable=not progress):
        if before_image is not None:
            before_image()
        try:
            prediction = stage_one.predict(datastore.get_image_uri(image_id), templates, progress=progress)
        except NoTemplateError:
            raise
        except InputError as e:
            logger.warning(f"stage 1: {image_id} skipped: {e}")
            if errors is not None:
                errors[image_id] = str(e)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = save_label(prediction.label, prediction.image, Path(tmp) / "label.nii.gz")
            cases[image_id] = prediction.summary(names)
            datastore.save_label(image_id, str(out), PSEUDO_TAG, {"model": "semisam_prototype", "templates": [t.image_id for t in templates], **cases[image_id]})
    return cases


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
    cases = refresh_pseudo_labels(build_stage_one(studies, config), datastore, label_map(templates, config.labels), progress, errors)
    report = {"images": len(cases), "templates": [t.image_id for t in templates], "seconds": round(time.perf_counter() - start, 1),
              "cases": cases, "errors": errors}
    (studies / ".semisam").mkdir(exist_ok=True)
    (studies / ".semisam" / "stage1.json").write_text(json.dumps(report, indent=2))
    return report


def run_stage_two(studies: Path, config: AppConfig, truth: Path | None = None, report_dir: Path | None = None, progress: bool = True) -> dict:
    """Stage two's rounds over every image without a ``final`` label, then a report folder.

    Report (``report_dir``, default ``studies/.semisam/report``): ``rounds.json`` (per-round stats and,
    with ``truth``, pool Dice per round), ``dice_per_round.png`` (with ``truth``) and
    ``overlay_<case>.png`` for the first three cases (image, final pseudo-label, uncertainty).
    """
    from semisam_o1.evaluation import mean_dice, scores
    from semisam_o1.report import dice_per_round_plot, overlay
    from semisam_o1.stage_two import StageTwo
    from semisam_o1.volumes import load_image, load_label, load_map

    studies = Path(studies)
    datastore = open_datastore(studies)
    templates = find_templates(datastore)
    stage_one = build_stage_one(studies, config)
    two = StageTwo(studies, stage_one, config.stage_two_params())
    pool = {i: Path(datastore.get_image_uri(i)) for i in sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))}
    state = two.run(templates, pool, progress=progress)
    rounds, published = len(state["rounds"]), two.published(state)
    for image_id in pool:  # the published round's pseudo-labels
        datastore.save_label(image_id, str(two.labels_dir(published) / f"{image_id}.nii.gz"), PSEUDO_TAG, {"model": "semisam_o1", "round": published})

    report_dir = Path(report_dir or studies / ".semisam" / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    report = {"rounds": state["rounds"], "published": state.get("published"), "stopped_early": state.get("stopped_early"),
              "pseudo_templates": state.get("pseudo_templates", [])}
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
    (report_dir / "rounds.json").write_text(json.dumps(report, indent=2))
    return report

