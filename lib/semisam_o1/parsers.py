"""Settings as text: what the command line writes (``--conf``, ``--set``, a ``--params`` file, a request's
override) parsed into a typed value checked against its bounds, and a value written back as that text.

Every parser takes the text (or a JSON/YAML scalar) and returns the value, or raises :class:`ConfError` whose
message quotes the text and says what it is not (``'0' is not an integer in [1, 20]``); the callers put the key in
front. :func:`as_text` writes a value back the way the command line writes it (``(0, 1, 2)`` -> ``0,1,2``, ``None``
-> ``auto``, ``True`` -> ``true``): ``/info/``, ``main.py params`` and the README show values so.
"""

from __future__ import annotations

from dataclasses import is_dataclass


class ConfError(ValueError):
    """A setting's key is unknown or its value cannot be parsed (``--conf``, ``--set``, ``--params``, a request's override)."""


def parse_bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case)."""
    value = str(text).strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ConfError(f"'{text}' is not true/false")
    return value in {"true", "1", "yes"}


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


def _or_auto(parse_number):
    def parse(text: str):
        return None if str(text).strip().lower() == "auto" else parse_number(text)

    return parse


def parse_choice(*choices: str):
    """Parser of one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ConfError(f"'{text}' is not one of {', '.join(choices)}")
        return text

    return parse


def as_text(value) -> str:
    """A setting's value as the command line writes it: ``(0, 1, 2)`` -> ``0,1,2``, ``None`` -> ``auto``."""
    if value is None:
        return "auto"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if is_dataclass(value):
        return type(value).__name__
    return str(value).lower() if isinstance(value, bool) else str(value)
