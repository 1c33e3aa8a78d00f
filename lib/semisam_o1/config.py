"""The app's settings: a dozen operator options (``--conf key value``) and the research settings
(``--set section.field=value`` or ``--params FILE``), parsed and validated in one place.

MONAI Label hands an app its ``--conf`` pairs as a ``dict[str, str]``. :class:`AppConfig` turns that into typed
values; an unknown key or a malformed value is an error naming the key, so a typo never silently falls back to a
default. Operator options are :class:`AppConfig`'s fields (``python main.py serve --help``, README). Research
settings are the fields of the params dataclasses (:data:`SECTIONS`, ``python main.py params``): each default is
written there once, and a conf key ``<section>.<field>`` (what ``--set`` becomes) overrides it. ``params`` names a
JSON or YAML file of such overrides (``{"stage_two": {"warm_lr": 2}}``); a ``--set`` of the same field wins.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from semisam_o1.choices import ENCODERS
from semisam_o1.stage_one.params import FloorParams, PropagationParams, StageOneParams
from semisam_o1.stage_two.params import RefineParams, StageTwoParams, TrainParams


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


#: research-setting sections: ``--set <section>.<field>=<value>`` sets a field of that dataclass
SECTIONS = {"stage_one": StageOneParams, "propagation": PropagationParams, "floor": FloorParams,
            "stage_two": StageTwoParams, "train": TrainParams, "refine": RefineParams}
#: fields that are operator options (:class:`AppConfig`) or nested sections, not research settings
NOT_RESEARCH = frozenset({"stage_two.rounds", "stage_two.train", "stage_two.refine", "train.iterations", "train.processes"})


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
        options = {name: _text(getattr(self, name)) for name, _ in OPTIONS if name not in ("labels", "encoder_checkpoint", "params")}
        options.update(labels=",".join(f"{n}={v}" for n, v in self.labels.items()), encoder_checkpoint=bool(self.encoder_checkpoint),
                       params=bool(self.params))
        return {"options": options, "research_settings": self.conf()}

    def conf(self) -> dict[str, str]:
        """The research settings as conf keys (``{"stage_two.warm_lr": "2.0"}``): what rebuilds them elsewhere."""
        return {f"{s}.{f}": _text(v) for s, f, v in self.research}

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
                research[key] = _parse_research(key, raw, f"{Path(conf['params']).name}: ")
        for key, raw in conf.items():
            if key in MONAI_LABEL_KEYS:
                continue
            if "." in key:
                research[key] = _parse_research(key, raw, "--set ")
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
            return _parse_research(key, raw, "")
        by_name = {f.name: f for f in fields(cls) if f.name != "research"}
        if key not in by_name:
            raise ConfError(f"{key}: unknown option; known options: {', '.join(sorted(by_name))} "
                            "(research settings: <section>.<field>, see python main.py params)")
        try:
            return by_name[key].metadata["parse"](raw)
        except ConfError as e:
            raise ConfError(f"{key}: {e}") from None


def read_params_file(path: str | Path) -> dict[str, object]:
    """A research-settings file as ``{"<section>.<field>": value}``: JSON, or YAML (``.yaml``/``.yml``), holding
    ``{section: {field: value}}`` or ``{"<section>.<field>": value}``.

    Raises:
        ConfError: naming the file, when it cannot be read or parsed.
    """
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:
        raise ConfError(f"--conf params: {path.name} cannot be read: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfError(f"--conf params: {path.name} is not YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfError(f"--conf params: {path.name} must hold a mapping of sections to settings")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def research_field(key: str):
    """The dataclass field a research key ``<section>.<field>`` names.

    Raises:
        ConfError: the section or the field does not exist, or it is an operator option.
    """
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfError(f"{key}: unknown section '{section}'; sections: {', '.join(SECTIONS)}")
    by_name = {f.name: f for f in fields(SECTIONS[section])}
    if name not in by_name or key in NOT_RESEARCH:
        if key in NOT_RESEARCH and name in ("rounds", "iterations", "processes"):
            raise ConfError(f"{key}: an operator option, set it with --conf {'train_processes' if name == 'processes' else name}")
        known = [n for n in by_name if f"{section}.{n}" not in NOT_RESEARCH]
        raise ConfError(f"{key}: unknown setting; {section} has {', '.join(known)}")
    return by_name[name]


def research_settings() -> list[dict]:
    """Every research setting: ``[{"key": "<section>.<field>", "type", "default", "help"}]`` in section order, the help
    being the ``#:`` comment above the field in its dataclass (``python main.py params``, README)."""
    rows = []
    for section, cls in SECTIONS.items():
        docs = field_comments(cls)
        for f in fields(cls):
            key = f"{section}.{f.name}"
            if key in NOT_RESEARCH:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            rows.append({"key": key, "type": str(f.type), "default": _text(default), "help": plain(docs.get(f.name, ""))})
    return rows


def plain(text: str) -> str:
    """Docstring markup as plain Markdown: ``:func:`~a.b.c` `` -> `` `c` ``, double backquotes -> single.

    >>> plain("see :func:`~semisam_o1.stage_two.labels.resolve_ensemble` and ``auto``")
    'see `resolve_ensemble` and `auto`'
    """
    import re

    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def field_comments(cls) -> dict[str, str]:
    """``{field: the #: comment lines right above it, joined}`` of a dataclass, read from its source."""
    lines = inspect.getsource(cls).splitlines()
    out, pending = {}, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        node = None
        try:
            node = ast.parse(stripped).body[0] if stripped and not stripped.startswith(("@", "class ", "def ", '"""')) else None
        except SyntaxError:
            pass
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and pending:
            out[node.target.id] = " ".join(pending)
        pending = []
    return out


def _parse_research(key: str, raw, where: str):
    f = research_field(key)
    try:
        return parse_typed(f, raw)
    except ConfError as e:
        raise ConfError(f"{where}{key}: {e}") from None


def parse_typed(f, raw):
    """A research value (text from the command line, or a JSON/YAML value) as field ``f``'s type, checked against
    its ``metadata`` ``choices`` or ``range``; ``auto``/``none`` is ``None`` where the field allows it.

    >>> from semisam_o1.stage_two.params import StageTwoParams
    >>> parse_typed(research_field("stage_two.warm_lr"), "2"), parse_typed(research_field("train.patch"), "48")
    (2.0, (48, 48, 48))
    """
    kind = str(f.type).replace(" ", "")
    optional = "|None" in kind or "None|" in kind or kind.startswith("Optional")
    kind = kind.replace("|None", "").replace("None|", "")
    text = _text(raw)
    if optional and text.strip().lower() in ("auto", "none", ""):
        return None
    meta = f.metadata
    low, high = meta.get("range", (-float("inf"), float("inf")))
    if kind == "bool":
        return parse_bool(text)
    if kind == "int":
        return parse_int(int(low) if low != -float("inf") else -10**18, int(high) if high != float("inf") else 10**18)(text)
    if kind == "float":
        return parse_float(low, high)(text)
    if kind == "str":
        return parse_choice(*meta["choices"])(text) if "choices" in meta else text
    if kind.startswith("tuple[int"):
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ConfError(f"'{text}' is not a comma-separated list of integers") from None
        default = f.default if f.default is not MISSING else ()
        if "..." not in kind and len(values) == 1 and len(default) > 1:
            values = values * len(default)
        if not values or ("..." not in kind and len(values) != len(default)):
            raise ConfError(f"'{text}' is not {len(default)} comma-separated integers")
        if any(not low <= v <= high for v in values):
            raise ConfError(f"'{text}' has a value outside [{low}, {high}]")
        if meta.get("distinct") and len(set(values)) != len(values):
            raise ConfError(f"'{text}' repeats a value")
        return values
    raise ConfError(f"settings of type {f.type} cannot be set from the command line")


def _text(value) -> str:
    """A setting's value as the command line writes it: ``(0, 1, 2)`` -> ``0,1,2``, ``None`` -> ``auto``."""
    if value is None:
        return "auto"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if is_dataclass(value):
        return type(value).__name__
    return str(value).lower() if isinstance(value, bool) else str(value)


#: Keys MONAI Label itself puts into an app's conf.
MONAI_LABEL_KEYS = frozenset({"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"})

#: ``(key, help)`` of every operator option, for ``--help`` and the README.
OPTIONS = [(f.name, f.metadata["help"]) for f in fields(AppConfig) if f.name != "research"]
