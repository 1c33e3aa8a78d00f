"""The research settings: every field of the params dataclasses (:data:`SECTIONS`), named ``<section>.<field>``.

A field's default and help are written once, in its dataclass (the help is the ``#:`` comment above the field).
This module turns text into a field's value and lists the fields; it holds no default of its own:

- :func:`research_field` finds the field a key names; an unknown section or field, a nested section, or an operator
  option that :class:`~semisam_o1.config.AppConfig` holds instead (:data:`NOT_RESEARCH`) is a
  :class:`~semisam_o1.parsers.ConfError` naming what is known;
- :func:`parse_typed` parses a value as the field's type, checked against its metadata ``range``, ``choices`` or
  ``distinct``; :func:`parse_research` does both and puts the key (and where it came from) in the message;
- :func:`read_params_file` reads a ``--params`` file (JSON, or YAML) into ``{"<section>.<field>": value}``;
- :func:`research_settings` lists every setting with its type, default and help (``main.py params``, README).
"""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import MISSING, fields
from pathlib import Path

from semisam_o1.parsers import ConfError, as_text, parse_bool, parse_choice, parse_float, parse_int
from semisam_o1.stage_one.params import FloorParams, PropagationParams, StageOneParams
from semisam_o1.stage_two.params import RefineParams, StageTwoParams, TrainParams

#: research-setting sections: ``--set <section>.<field>=<value>`` sets a field of that dataclass
SECTIONS = {"stage_one": StageOneParams, "propagation": PropagationParams, "floor": FloorParams,
            "stage_two": StageTwoParams, "train": TrainParams, "refine": RefineParams}
#: fields that are operator options (:class:`~semisam_o1.config.AppConfig`) or nested sections, not research settings
NOT_RESEARCH = frozenset({"stage_two.rounds", "stage_two.train", "stage_two.refine", "train.iterations", "train.processes"})


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
            rows.append({"key": key, "type": str(f.type), "default": as_text(default), "help": plain(docs.get(f.name, ""))})
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


def parse_research(key: str, raw, where: str):
    """The value of research setting ``key`` (:func:`research_field`) parsed from ``raw`` (:func:`parse_typed`).

    Raises:
        ConfError: ``"<where><key>: <problem>"``, e.g. ``--set stage_two.warm_lr: 'x' is not a number``.
    """
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
    text = as_text(raw)
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
