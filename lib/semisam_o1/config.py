"""The app's ``--conf key value`` options: parsed, validated and documented in one place.

MONAI Label hands an app its ``--conf`` pairs as a ``dict[str, str]``. :class:`AppConfig` turns that
into typed values; an unknown key or a malformed value is an error naming the key, so a typo never
silently falls back to a default. ``python main.py serve --help`` and README.md list the options
from :data:`OPTIONS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from semisam_o1.choices import (AUGMENTATIONS, BOUNDARIES, ENCODERS, ENSEMBLES, FUSION_DECISIONS, PROPAGATIONS, PUBLISH, REFINEMENTS,
                                REGISTRATIONS)


def is_dicomweb(studies) -> bool:
    """Whether the server's studies source ``studies`` (str or path) is a DICOMweb server's URL
    (``http://`` or ``https://``); anything else is a local datastore folder.

    >>> is_dicomweb("https://pacs.example/dicom-web"), is_dicomweb("sample-datastore")
    (True, False)
    """
    return str(studies).startswith(("http://", "https://"))


class ConfError(ValueError):
    """A ``--conf`` key is unknown or its value cannot be parsed."""


def parse_label_map(text: str) -> dict[str, int]:
    """``"anterior=1,posterior=2"`` -> ``{"anterior": 1, "posterior": 2}``.

    Raises:
        ConfError: an entry is not ``name=index`` with a positive integer index, or names/indices repeat.
    """
    labels: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, index = entry.partition("=")
        if not sep or not name.strip() or not index.strip().isdigit() or int(index) <= 0:
            raise ConfError(f"'{entry}' is not name=index with an index >= 1 (0 is background)")
        if name.strip() in labels or int(index) in labels.values():
            raise ConfError(f"'{entry}' repeats a name or an index")
        labels[name.strip()] = int(index)
    return labels


def parse_bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case)."""
    value = str(text).strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ConfError(f"'{text}' is not true/false")
    return value in {"true", "1", "yes"}


def parse_axes(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: slice orientations (volume axes) the encoder runs on."""
    try:
        axes = tuple(int(a) for a in str(text).split(",") if a.strip())
    except ValueError:
        raise ConfError(f"'{text}' is not a comma-separated list of axes 0, 1, 2") from None
    if not axes or set(axes) - {0, 1, 2} or len(set(axes)) != len(axes):
        raise ConfError(f"'{text}' is not a comma-separated list of distinct axes 0, 1, 2")
    return axes


def parse_int(low: int, high: int):
    """Parser of an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        if not str(text).strip().lstrip("-").isdigit() or not low <= int(text) <= high:
            raise ConfError(f"'{text}' is not an integer in [{low}, {high}]")
        return int(text)

    return parse


def parse_float(low: float, high: float):
    """Parser of a number in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfError(f"'{text}' is not a number") from None
        if not low <= value <= high:
            raise ConfError(f"'{text}' is not in [{low}, {high}]")
        return value

    return parse


def parse_auto_int(low: int, high: int):
    """Parser of ``auto`` (-> ``None``: planned from the datastore) or an integer in ``[low, high]``."""
    return _or_auto(parse_int(low, high))


def parse_auto_float(low: float, high: float):
    """Parser of ``auto`` (-> ``None``: decided from the data) or a number in ``[low, high]``."""
    return _or_auto(parse_float(low, high))


def _or_auto(parse_number):
    def parse(text: str):
        return None if str(text).strip().lower() == "auto" else parse_number(text)

    return parse


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine (:func:`~semisam_o1.plan.resolve_device`)."""
    from semisam_o1.plan import DeviceError, resolve_device

    try:
        resolve_device(text)
    except DeviceError as e:
        raise ConfError(str(e).split(": ", 1)[-1]) from None
    return str(text).strip().lower()


def parse_ray_address(text: str) -> str:
    """``""`` (in process), ``local``, ``auto``, ``ray://host:port`` or ``host:port`` (a cluster's GCS address)."""
    text = str(text).strip()
    if text in ("", "local", "auto") or text.startswith("ray://") or re.fullmatch(r"[\w.\-]+:\d{1,5}", text):
        return text
    raise ConfError(f"{text!r} is not a Ray address (empty, local, auto, ray://host:port or host:port)")


def parse_choice(*choices: str):
    """Parser of one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ConfError(f"'{text}' is not one of {', '.join(choices)}")
        return text

    return parse


def _option(default, parse, help: str):
    """A dataclass field carrying its ``--conf`` parser and help text."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"parse": parse, "help": help}, **kwargs)


@dataclass(frozen=True)
class AppConfig:
    """Typed view of the app's ``--conf`` options (defaults are what the sample datastore needs)."""

    labels: dict[str, int] = _option(
        dict, parse_label_map, "label names for the template's label values, e.g. anterior=1,posterior=2"
    )
    encoder: str = _option(
        "litemedsam", parse_choice(*ENCODERS), "foundation image encoder"
    )
    encoder_checkpoint: str = _option("", str, "SAM checkpoint path (needed for sam_vit_*)")
    encoder_image_size: int | None = _option(
        None, parse_auto_int(32, 1024), "LiteMedSAM slice input size in pixels (multiple of 32), or auto (planned: 64 on CPU, up to 256 on GPU)"
    )
    encoder_axes: tuple = _option((0, 1, 2), parse_axes, "slice orientations encoded and fused, e.g. 0,1,2")
    feature_dims: int = _option(32, parse_int(4, 256), "stored feature dimension after PCA (float16: 2 bytes each)")
    modality: str = _option("mri", parse_choice("mri", "ct"), "intensity normalisation: mri (percentiles) or ct (window)")
    feature_stride: int | None = _option(
        None, parse_auto_int(1, 8), "features stored every N voxels per axis (thick-slice axes: 1), interpolated on lookup; auto = plan (2)"
    )
    registration: str = _option(
        "demons+syn", parse_choice(*REGISTRATIONS, "+".join(REGISTRATIONS)),
        "stage one's spatial prior: demons (affine + diffeomorphic demons, SimpleITK), syn (ANTs SyN, antspyx), or demons+syn (both vote)"
    )
    device: str = _option("auto", parse_device, "where the encoder and the network run: auto (CUDA if available), cpu, cuda, cuda:N")
    ray_address: str = _option(
        "", parse_ray_address,
        "pool-wide work (features, registrations, stage-one labels) on Ray: empty = in this process; local = a Ray instance on this machine "
        "with --conf workers; auto or ray://host:port or host:port = an existing cluster (the datastore must be on storage every worker sees)",
    )
    workers: int = _option(2, parse_int(1, 1024), "with ray_address local: Ray worker processes (CPUs) started on this machine")
    train_processes: int | None = _option(
        None, parse_auto_int(1, 64),
        "stage-two training processes (torch DistributedDataParallel, one per GPU; gloo on CPU); auto = one per visible GPU, else 1",
    )

    propagation: str = _option(
        "fusion", parse_choice(*PROPAGATIONS),
        "stage one: fusion (registration-guided feature label fusion) or prototype (the paper's per-class prototypes; ablation)",
    )
    fusion_decision: str = _option(
        "argmax", parse_choice(*FUSION_DECISIONS),
        "stage one's label fusion: argmax of the smoothed class votes, or volume (the argmax, except that a class it gives under 95 percent "
        "of the voxels its vote shares sum to grows to that volume: fused votes starve thin classes, e.g. hippocampus)",
    )

    rounds: int = _option(3, parse_int(1, 20), "stage-two rounds (train, predict with uncertainty, refine)")
    iterations: int | None = _option(
        None, parse_auto_int(1, 100000), "training iterations per round (batch of 4 patches); auto = planned: 1000 for crops, 3000 for scans"
    )
    patch: int = _option(32, parse_int(16, 256), "training/inference patch edge in voxels (cube)")
    augment: str = _option(
        "flip", parse_choice(*AUGMENTATIONS),
        "stage two's training augmentation: flip (mirroring where no class mirrors onto another, intensity jitter) or affine "
        "(also random rotation up to 15 degrees, in-plane on thick slices, and scaling by up to 15 percent)",
    )
    refinement: str = _option(
        "none", parse_choice(*REFINEMENTS),
        "stage two's pseudo-label correction after each round: none (the round's soft labels' argmax), voxel (the paper's kNN "
        "relabelling of the most uncertain voxels in feature space) or volume (the published code's)",
    )
    publish: str = _option(
        "network_entropy", parse_choice(*PUBLISH),
        "stage two: the round whose network is served: the last, or the best by a label-free signal (then rounds stop early once one is not the best)",
    )
    pseudo_templates: int = _option(
        1, parse_int(0, 20), "stage two: pool images whose stage-one labels are most trusted (label-free) join the templates for round 0, "
        "unless that changes the pool's class volumes by more than 10 percent (0 = off; more than 3 lowered hippocampus's labels; see the README)"
    )
    boundary: str = _option(
        "edges", parse_choice(*BOUNDARIES),
        "stage two: round 0's labels (what round 1 trains on): edges = stage one's class borders moved to the image's intensity "
        "edges within one voxel (random walker); none = as stage one drew them",
    )
    replace_confidence: float | None = _option(
        None, parse_auto_float(0.0, 1.0),
        "stage two: a round's label replaces the previous round's only where its soft label's top class holds at least this probability "
        "(0 = everywhere); auto = 0.6 when round 1's network kept its training labels' class volumes within 10% (what keeps ensemble "
        "auto at mean), else 0",
    )
    real_share: float = _option(
        0.5, parse_float(0.0, 0.95),
        "stage two: share of each round's training patches drawn from the real-labelled images (templates, final labels; at least their "
        "share of the images), the rest from the pool's pseudo-labels (0 = every image equally often)",
    )
    warm_start: bool = _option(
        True, parse_bool,
        "stage two: rounds after the first continue training the previous round's network (the full learning-rate schedule again, "
        "the same steps per round) instead of a fresh one (false: from scratch every round, as the paper does)",
    )
    warm_lr: float = _option(
        2.0, parse_float(0.1, 10.0),
        "stage two: with warm_start, the peak learning rate of the rounds after the first as a multiple of round 1's (1 = the same every round)",
    )
    teacher_floor: bool = _option(
        True, parse_bool,
        "stage two: a round's class that drifted from stage one's label of the image beyond the safety floor's bounds returns to stage one's",
    )
    network_voxels: int = _option(
        1_000_000, parse_int(0, 10**10),
        "stage two: the network trains and predicts on each image shrunk to at most this many voxels (finest axes first; 0 = the image's grid)",
    )
    ensemble: str = _option(
        "auto", parse_choice(*ENSEMBLES),
        "stage two: a round's soft labels: mean = of stage one's and every round's network so far (temporal ensemble); "
        "anchored = stage one's and the mean of the rounds' networks half and half; latest = stage one's and the round's network half and half; "
        "network = the round's network alone; "
        "auto = mean, or from round 2 on latest (anchored without warm_start) when round 1's network changed its training labels' "
        "class volumes by more than 10%",
    )
    uncertain_quantile: float = _option(0.98, parse_float(0.0, 1.0), "entropy quantile above which a voxel is refined")
    knn: int = _option(10, parse_int(1, 100), "neighbours voting in the refinement")
    position_weight: float = _option(
        0.2, parse_float(0.0, 10.0), "refinement: weight of a voxel's position (first template's grid) next to its features"
    )

    skip_served_seconds: int = _option(
        600, parse_int(0, 7 * 24 * 3600), "active learning: an image served to one client is not offered to another for this long"
    )

    def stage_two_params(self):
        """The :class:`~semisam_o1.stage_two.StageTwoParams` these options describe."""
        from semisam_o1.refinement import RefineParams
        from semisam_o1.segmenter import TrainParams
        from semisam_o1.stage_two import StageTwoParams

        return StageTwoParams(
            rounds=self.rounds,
            train=TrainParams(patch=(self.patch,) * 3, iterations=self.iterations, processes=self.train_processes, augment=self.augment),
            refine=RefineParams(uncertain_quantile=self.uncertain_quantile, k=self.knn, position_weight=self.position_weight),
            refinement=self.refinement,
            publish=self.publish,
            pseudo_templates=self.pseudo_templates,
            boundary=self.boundary,
            replace_confidence=self.replace_confidence,
            teacher_floor=self.teacher_floor,
            real_share=self.real_share,
            warm_start=self.warm_start,
            warm_lr=self.warm_lr,
            network_voxels=self.network_voxels or None,
            ensemble=self.ensemble,
        )

    def encoder_spec(self, planned_image_size: int = 64):
        """The :class:`~semisam_o1.encoders.EncoderSpec` these options describe (``encoder_image_size auto``:
        ``planned_image_size``, from the datastore's :class:`~semisam_o1.plan.Plan`)."""
        from semisam_o1.encoders import EncoderSpec

        size = self.encoder_image_size or planned_image_size
        return EncoderSpec(self.encoder, self.encoder_checkpoint or None, size, self.encoder_axes)

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> "AppConfig":
        """Parse MONAI Label's ``conf`` dict; MONAI Label's own keys (e.g. ``server_mode``) are ignored.

        Raises:
            ConfError: naming the key, for an unknown key or a value its parser rejects.
        """
        values = {}
        for key, raw in (conf or {}).items():
            if key in MONAI_LABEL_KEYS:
                continue
            try:
                values[key] = cls.parse_option(key, raw)
            except ConfError as e:
                raise ConfError(f"--conf {e}") from None
        return cls(**values)

    @classmethod
    def parse_option(cls, key: str, raw):
        """One option's value, parsed as ``--conf`` parses it (also for request overrides, e.g. training).

        Raises:
            ConfError: ``"<key>: <problem>"``, for an unknown key or a value its parser rejects.
        """
        by_name = {f.name: f for f in fields(cls)}
        if key not in by_name:
            raise ConfError(f"{key}: unknown option; known options: {', '.join(sorted(by_name))}")
        try:
            return by_name[key].metadata["parse"](raw)
        except ConfError as e:
            raise ConfError(f"{key}: {e}") from None


#: Keys MONAI Label itself puts into an app's conf.
MONAI_LABEL_KEYS = frozenset({"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"})

#: ``(key, help)`` of every option, for ``--help`` and the README.
OPTIONS = [(f.name, f.metadata["help"]) for f in fields(AppConfig)]

