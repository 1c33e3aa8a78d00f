"""Pool-wide steps over a datastore, shared by the ``pipeline`` command and the server's jobs.

Per-image steps (:func:`prepare_image`: features + registrations; :func:`pseudo_label_image`: stage
one) run through a :class:`~semisam_o1.distributed.PoolRunner`: in this process, or as Ray tasks with
``--conf ray_address`` (a worker rebuilds the stage one from ``(studies, config)``, :func:`stage_one_of`).
Labels are saved to the datastore by the calling process only, never as ``final``; workers write caches only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from semisam_o1.config import AppConfig
from semisam_o1.distributed import PoolRunner
from semisam_o1.safe_names import public
from semisam_o1.stage_one.feature_cache import FeatureCache
from semisam_o1.stage_one.plan import load_or_make_plan, resolve_device
from semisam_o1.stage_one.predictor import NoTemplateError, StageOne
from semisam_o1.templates import PSEUDO_TAG, STAGE_ONE_MODEL, find_templates
from semisam_o1.volumes import InputError, Volume, atomic_write, check_image_file, load_image, save_label

logger = logging.getLogger(__name__)


def open_datastore(studies: Path) -> LocalDatastore:
    """MONAI Label's own local datastore over ``studies`` (no file watching)."""
    return LocalDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)


def build_stage_one(studies: Path, config: AppConfig) -> StageOne:
    """Stage one over ``studies`` with the datastore's plan (read, or planned now from its images and written); its features
    normalised for the plan's modality (``--conf modality auto``: detected from the images) or the explicit one."""
    device = resolve_device(config.device)
    one = config.stage_one_params()
    overrides = {"encoder_image_size": one.encoder_image_size, "feature_stride": one.feature_stride, "coarsest_grid_mm": one.coarsest_grid_mm,
                 "demons_affine": one.demons_affine,
                 "modality": None if config.modality == "auto" else config.modality}
    images = sorted(p for ext in ("*.nii.gz", "*.nii") for p in Path(studies).glob(ext))
    plan = load_or_make_plan(studies, images, device, overrides)
    cache = FeatureCache(studies, config.encoder_spec(plan.encoder_image_size), one.feature_dims, plan.modality, plan, device)
    return StageOne(studies, cache, label_values=set(config.labels.values()) or None, label_names=config.labels,
                    registration=one.registration, propagation=one.propagation, params=config.section("propagation"),
                    floor=config.section("floor"))


#: A stage one, or what rebuilds it in a worker process: ``(studies, config)`` (see :func:`stage_one_of`).
StageOneSource = Union[StageOne, tuple]

_BUILT: dict[tuple[str, str], object] = {}  # stage ones and stage twos a worker built


def stage_one_of(source: StageOneSource) -> StageOne:
    """``source`` itself, or the stage one of ``(studies, config)``, built once per process (a Ray worker
    keeps its encoder and template banks between tasks)."""
    if isinstance(source, StageOne):
        return source
    studies, config = source
    key = (str(studies), repr(config))
    if key not in _BUILT:
        _BUILT[key] = build_stage_one(Path(studies), config)
    return _BUILT[key]


def stage_two_of(source):
    """``source`` itself (a :class:`~semisam_o1.stage_two.rounds.StageTwo`), or the stage two of ``(studies, config)``,
    built once per process (over :func:`stage_one_of`'s stage one)."""
    from semisam_o1.stage_two.rounds import StageTwo

    if isinstance(source, StageTwo):
        return source
    studies, config = source
    key = (f"{studies}:stage_two", repr(config))
    if key not in _BUILT:
        _BUILT[key] = StageTwo(Path(studies), stage_one_of(source), config.stage_two_params())
    return _BUILT[key]


def prepare_image(image_path: str, source: StageOneSource, template_paths: list[str]) -> None:
    """One image's stage-one caches: its features (encoded once) and its registration to every
    template by every method of the prior. Idempotent (content-hash cache files, locked, atomic)."""
    stage_one = stage_one_of(source)
    stage_one.cache.get_or_compute(load_image(image_path))
    for template in template_paths:
        for method in stage_one.methods:
            stage_one.transform(Path(image_path), Path(template), method)


def pseudo_label_image(image_path: str, source: StageOneSource, templates: list, names: dict[str, int]) -> tuple[np.ndarray, Volume, dict]:
    """Stage one on one image: ``(label (D, H, W) uint8, the image's geometry (a Volume whose array is
    empty), summary)``; nothing is written but caches."""
    prediction = stage_one_of(source).predict(image_path, templates)
    geometry = dataclasses.replace(prediction.image, array=np.empty((0, 0, 0), np.float32))
    return prediction.label.astype(np.uint8), geometry, prediction.summary(names)


def pool_runner(studies: Path, config: AppConfig) -> PoolRunner:
    """The :class:`~semisam_o1.distributed.PoolRunner` of ``--conf ray_address`` (in process when empty);
    on Ray, every node is checked to see ``studies`` and tasks ask for a GPU when the work runs on one.

    Raises:
        ClusterError: unreachable address, or a worker that cannot use ``studies``.
    """
    runner = PoolRunner(config.ray_address, config.workers)
    if runner.distributed:
        runner.num_gpus = 1 if config.device.startswith("cuda") or (config.device == "auto" and runner.cluster_gpus()) else 0
        try:
            runner.check_shared_path(Path(studies))
        except Exception:
            runner.close()
            raise
    return runner


def _source(stage_one: StageOne, config: AppConfig | None, runner: PoolRunner) -> StageOneSource:
    return (stage_one.studies.resolve(), config) if runner.distributed else stage_one


def encode_first_template(runner: PoolRunner, source: StageOneSource, templates: list) -> None:
    """Encode the first template before any other image: the cache's feature basis is fitted on the
    first image encoded, so this makes it the same whatever order workers finish in."""
    for _, _, error in runner.map(prepare_image, [str(t.image_path) for t in templates[:1]], source, []):
        if error is not None:
            raise error


def refresh_pseudo_labels(stage_one: StageOne, datastore: Datastore, names: dict[str, int], progress: bool = False,
                          errors: dict[str, str] | None = None, before_image=None, runner: PoolRunner | None = None,
                          config: AppConfig | None = None, image_ids: list[str] | None = None, tag: str = PSEUDO_TAG) -> dict:
    """Stage one from the datastore's current templates on ``image_ids`` (default: every image without a
    ``final`` label).

    Saves each result under ``tag`` (``pseudo``; never ``final``) with its summary as label info.
    Returns ``{image_id: summary}``; an image that fails (bad file, failed registration) is logged,
    its message put in ``errors[image_id]`` (when given), and skipped: the rest of the pool goes on.
    ``before_image()`` is called before each image in process (the server's refresh waits there while
    an interactive request runs, :mod:`semisam_o1.server.priority`). With a distributed ``runner`` (and the
    ``config`` the workers rebuild ``stage_one`` from), every image is a Ray task; labels are saved here.
    """
    runner = runner or PoolRunner()
    templates = find_templates(datastore)
    if tag == DefaultLabelTag.FINAL:
        raise ValueError("stage-one labels are never saved as 'final'")
    ids = datastore.get_unlabeled_images(DefaultLabelTag.FINAL) if image_ids is None else image_ids
    paths = {datastore.get_image_uri(i): i for i in sorted(ids)}
    cases = {}
    encode_first_template(runner, _source(stage_one, config, runner), templates)
    for path, value, error in runner.map(pseudo_label_image, paths, _source(stage_one, config, runner), templates, names,
                                         desc="stage 1: propagate", progress=progress, before_each=before_image):
        image_id = paths[path]
        if isinstance(error, NoTemplateError) or (error is not None and not isinstance(error, InputError)):
            raise error
        if error is not None:
            logger.warning(f"stage 1: {image_id} skipped: {error}")
            if errors is not None:
                errors[image_id] = public(str(error))
            continue
        label, geometry, cases[image_id] = value
        with tempfile.TemporaryDirectory() as tmp:
            out = save_label(label, geometry, Path(tmp) / "label.nii.gz")
            datastore.save_label(image_id, str(out), tag, {"model": STAGE_ONE_MODEL, "templates": [t.image_id for t in templates], **cases[image_id]})
    return cases


def prepare_pool(stage_one: StageOne, datastore: Datastore, runner: PoolRunner | None = None, config: AppConfig | None = None,
                 progress: bool = False, before_image=None, on_image=None) -> tuple[list[str], dict[str, str]]:
    """:func:`prepare_image` on every image of the datastore (the ``features`` job): ``(done ids, {failed id: message})``.

    ``on_image(n, total, image_id, error)`` is called as each finishes (the job's progress lines).
    """
    runner = runner or PoolRunner()
    templates = find_templates(datastore)
    paths = {datastore.get_image_uri(i): i for i in sorted(datastore.list_images())}
    done, failed = [], {}
    encode_first_template(runner, _source(stage_one, config, runner), templates)
    for n, (path, _, error) in enumerate(runner.map(prepare_image, paths, _source(stage_one, config, runner), [str(t.image_path) for t in templates],
                                                    desc="features", progress=progress, before_each=before_image), 1):
        if error is not None and not isinstance(error, InputError):
            raise error
        if error is None:
            done.append(paths[path])
        else:  # one bad file must not stop the pool
            failed[paths[path]] = public(str(error))
        if on_image is not None:
            on_image(n, len(paths), paths[path], error)
    return done, failed


#: where pool jobs record the images they could not read: ``{job: {image_id: reason}}`` (``/info/`` shows them)
UNREADABLE_FILE = Path(".semisam") / "unreadable.json"


def record_unreadable(studies: Path, job: str, failed: dict[str, str]) -> None:
    """Record the images ``job`` (``features``, ``stage_one``, ``training``) skipped because they cannot be read,
    replacing that job's previous record; reasons name the image, never a server path."""
    path = Path(studies) / UNREADABLE_FILE
    record = unreadable_images(studies, by_job=True)
    record[job] = {i: public(reason) for i, reason in sorted(failed.items())}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def unreadable_images(studies: Path, by_job: bool = False) -> dict:
    """``{image_id: reason}`` of every image a pool job last skipped (``by_job``: ``{job: {image_id: reason}}``)."""
    path = Path(studies) / UNREADABLE_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    return record if by_job else {i: r for failed in record.values() for i, r in failed.items()}


def readable_pool(pool: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """``pool`` (``{image_id: path}``) split into the images :func:`~semisam_o1.volumes.check_image_file` accepts
    and ``{image_id: reason}`` of the others (a file put in the folder by hand bypasses the upload check)."""
    ok, failed = {}, {}
    for image_id, path in pool.items():
        try:
            check_image_file(path, f"image '{image_id}'")
            ok[image_id] = path
        except InputError as e:
            failed[image_id] = str(e)
    return ok, failed


def save_published_labels(datastore: Datastore, stage_two, state: dict, image_ids) -> int:
    """The published round's pseudo-labels (:meth:`~semisam_o1.stage_two.rounds.StageTwo.published`) of
    ``image_ids`` saved in ``datastore`` under tag ``pseudo`` (info: model ``semisam_o1``, the round);
    returns that round (0: stage one's labels)."""
    published = stage_two.published(state)
    for image_id in image_ids:
        datastore.save_label(image_id, str(stage_two.labels_dir(published) / f"{image_id}.nii.gz"), PSEUDO_TAG,
                             {"model": "semisam_o1", "round": published})
    return published
