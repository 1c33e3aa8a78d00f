"""The operator options: a dozen ``--conf key value`` settings, typed and validated in :class:`AppConfig`.

MONAI Label hands an app its ``--conf`` pairs as a ``dict[str, str]``. :class:`AppConfig` turns that into typed
values; an unknown key or a malformed value is a :class:`~semisam_o1.parsers.ConfError` naming the key, so a typo
never silently falls back to a default. Operator options are :class:`AppConfig`'s fields (``python main.py serve
--help``, README). A conf key ``<section>.<field>`` (what ``--set`` becomes) is a research setting
(:mod:`semisam_o1.research`): its default is the params dataclass's, and only the settings given that differ from it
are kept (``AppConfig.research``). ``params`` names a JSON or YAML file of such settings
(``{"stage_two": {"warm_lr": 2}}``); a ``--set`` of the same field wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from semisam_o1.choices import ENCODERS
from semisam_o1.parsers import ConfError, as_text, parse_auto_int, parse_choice, parse_int
from semisam_o1.research import SECTIONS, parse_research, read_params_file
from semisam_o1.stage_one.params import StageOneParams
from semisam_o1.stage_two.params import StageTwoParams, TrainParams


def is_dicomweb(studies) -> bool:
    """Whether the server's studies source ``studies`` (str or path) is a DICOMweb server's URL
    (``http://`` or ``https://``); anything else is a local datastore folder.

    >>> is_dicomweb("https://pacs.example/dicom-web"), is_dicomweb("sample-datastore")
    (True, False)
    """
    return str(studies).startswith(("http://", "https://"))


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


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine (:func:`~semisam_o1.stage_one.plan.resolve_device`)."""
    from semisam_o1.stage_one.plan import DeviceError, resolve_device

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


def _option(default, parse, help: str):
    """A dataclass field carrying its ``--conf`` parser and help text."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"parse": parse, "help": help}, **kwargs)


@dataclass(frozen=True)
class AppConfig:
    """Typed view of the app's ``--conf`` options (defaults are what the sample datastore needs) and of the research
    settings given (``research``: ``((section, field, value), ...)``, only those that differ from the dataclass)."""

    labels: dict[str, int] = _option(
        dict, parse_label_map, "label names for the template's label values, e.g. anterior=1,posterior=2 (default: from the templates)"
    )
    encoder: str = _option("litemedsam", parse_choice(*ENCODERS), "foundation image encoder: " + ", ".join(ENCODERS))
    encoder_checkpoint: str = _option("", str, "SAM checkpoint file (needed for sam_vit_*; LiteMedSAM ships with its package)")
    modality: str = _option(
        "auto", parse_choice("auto", "mri", "ct"),
        "intensity normalisation: mri (percentiles) or ct (Hounsfield window); auto = detected from the images and kept in the plan "
        "(ct: integer values with at least 1 percent of voxels at or below -900 HU, air)",
    )
    device: str = _option("auto", parse_device, "where the encoder and the network run: auto (CUDA if available), cpu, cuda, cuda:N")
    ray_address: str = _option(
        "", parse_ray_address,
        "pool-wide work on Ray: empty = in this process; local = Ray on this machine with --conf workers; auto, ray://host:port "
        "or host:port = an existing cluster (the datastore must be on storage every worker sees)",
    )
    workers: int = _option(2, parse_int(1, 1024), "with ray_address local: Ray worker processes (CPUs) started on this machine")
    train_processes: int | None = _option(
        TrainParams.processes, parse_auto_int(1, 64),
        "stage-two training processes (DistributedDataParallel, one per GPU); auto = one per visible GPU, else 1",
    )
    rounds: int = _option(StageTwoParams.rounds, parse_int(1, 20), "stage-two rounds (train, predict with uncertainty, update the labels)")
    iterations: int | None = _option(
        None, parse_auto_int(1, 100000), "training iterations per round (batches of 4 patches); auto = planned: 1000 for crops, 3000 for scans"
    )
    skip_served_seconds: int = _option(
        600, parse_int(0, 7 * 24 * 3600), "active learning: an image served to one client is not offered to another for this long"
    )
    params: str = _option("", str, "a JSON or YAML file of research settings, {section: {field: value}} (see python main.py params)")
    research: tuple = field(default=(), metadata={"help": ""})

    def section(self, name: str):
        """The ``name`` section's dataclass (:data:`SECTIONS`) with this config's research settings applied."""
        return replace(SECTIONS[name](), **{f: v for s, f, v in self.research if s == name})

    def stage_one_params(self) -> StageOneParams:
        return self.section("stage_one")

    def stage_two_params(self) -> StageTwoParams:
        """The :class:`~semisam_o1.stage_two.params.StageTwoParams` these options and research settings describe."""
        two = self.section("stage_two")
        train = replace(self.section("train"), iterations=self.iterations, processes=self.train_processes)
        return replace(two, rounds=self.rounds, train=train, refine=self.section("refine"), network_voxels=two.network_voxels or None)

    def encoder_spec(self, planned_image_size: int = 64):
        """The :class:`~semisam_o1.stage_one.encoders.EncoderSpec` these options describe (``encoder_image_size`` None:
        ``planned_image_size``, from the datastore's :class:`~semisam_o1.stage_one.plan.Plan`)."""
        from semisam_o1.stage_one.encoders import EncoderSpec

        one = self.stage_one_params()
        return EncoderSpec(self.encoder, self.encoder_checkpoint or None, one.encoder_image_size or planned_image_size, one.encoder_axes)

    def describe(self) -> dict:
        """What ``/info/`` shows of the settings: ``{"options": {option: value as --conf writes it}, "research_settings":
        {"<section>.<field>": value} (only those set differently from their default)}``; file paths are not shown
        (``encoder_checkpoint``, ``params``: whether one is set)."""
        options = {name: as_text(getattr(self, name)) for name, _ in OPTIONS if name not in ("labels", "encoder_checkpoint", "params")}
        options.update(labels=",".join(f"{n}={v}" for n, v in self.labels.items()), encoder_checkpoint=bool(self.encoder_checkpoint),
                       params=bool(self.params))
        return {"options": options, "research_settings": self.conf()}

    def conf(self) -> dict[str, str]:
        """The research settings as conf keys (``{"stage_two.warm_lr": "2.0"}``): what rebuilds them elsewhere."""
        return {f"{s}.{f}": as_text(v) for s, f, v in self.research}

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> "AppConfig":
        """Parse MONAI Label's ``conf`` dict; MONAI Label's own keys (e.g. ``server_mode``) are ignored.

        Raises:
            ConfError: naming the key, for an unknown key or a value its parser rejects.
        """
        values, research = {}, {}
        conf = dict(conf or {})
        if conf.get("params"):
            for key, raw in read_params_file(conf["params"]).items():
                research[key] = parse_research(key, raw, f"{Path(conf['params']).name}: ")
        for key, raw in conf.items():
            if key in MONAI_LABEL_KEYS:
                continue
            if "." in key:
                research[key] = parse_research(key, raw, "--set ")
                continue
            try:
                values[key] = cls.parse_option(key, raw)
            except ConfError as e:
                raise ConfError(f"--conf {e}") from None
        defaults = {key: getattr(SECTIONS[key.split(".")[0]](), key.split(".")[1]) for key in research}
        changed = tuple((*key.split("."), v) for key, v in sorted(research.items()) if v != defaults[key])
        return cls(**values, research=changed)

    @classmethod
    def parse_option(cls, key: str, raw):
        """One value, parsed as ``--conf`` parses it (also for request overrides, e.g. training): an operator option,
        or a research setting named ``<section>.<field>``.

        Raises:
            ConfError: ``"<key>: <problem>"``, for an unknown key or a value its parser rejects.
        """
        if "." in key:
            return parse_research(key, raw, "")
        by_name = {f.name: f for f in fields(cls) if f.name != "research"}
        if key not in by_name:
            raise ConfError(f"{key}: unknown option; known options: {', '.join(sorted(by_name))} "
                            "(research settings: <section>.<field>, see python main.py params)")
        try:
            return by_name[key].metadata["parse"](raw)
        except ConfError as e:
            raise ConfError(f"{key}: {e}") from None


#: Keys MONAI Label itself puts into an app's conf.
MONAI_LABEL_KEYS = frozenset({"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"})

#: ``(key, help)`` of every operator option, for ``--help`` and the README.
OPTIONS = [(f.name, f.metadata["help"]) for f in fields(AppConfig) if f.name != "research"]
