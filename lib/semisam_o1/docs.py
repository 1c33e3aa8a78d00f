"""README.md's generated tables: ``python main.py docs`` rewrites them, ``python main.py docs --check`` fails when
README.md differs (a test runs it).

Each table sits between ``<!-- <name>:begin -->`` and ``<!-- <name>:end -->`` markers:

- ``results``: per dataset, Dice of template only, registration only, ANTs SyN, stage one, stage two and full
  supervision, from ``benchmarks/results/*.json`` (:data:`RESULTS`; with a ``matrix_<dataset>.json`` also the mean
  over its templates);
- ``options``: the operator options (``--conf``) with their defaults, from :class:`~semisam_o1.config.AppConfig`;
- ``params``: the research settings (``--set``), from the params dataclasses (:func:`~semisam_o1.research.research_settings`).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from pathlib import Path

from semisam_o1 import PROJECT_ROOT
from semisam_o1.config import OPTIONS, AppConfig
from semisam_o1.parsers import as_text
from semisam_o1.research import research_settings

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"

#: ``(dataset, result file, how it was evaluated)``: the development benchmark of each dataset (one template); the
#: file's kind is read from its keys (``stage2.py``'s held-out test set, or ``atlas_bench``'s pool)
RESULTS = [
    ("hippocampus", "Hippocampus, T2 MRI (MSD Task04)", "stage2.json"),
    ("la", "Left atrium, LGE MRI", "la.json"),
    ("chaos", "Abdomen, T2 MRI (CHAOS), 4 organs", "chaos.json"),
    ("kbp_ct", "Head and neck CT (OpenKBP), 7 organs at risk", None),
]


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _machine(result: dict) -> str:
    m = result.get("machine") or {}
    device = result.get("device") or "cpu"
    return f"{m.get('cores', '?')}-core {m.get('cpu', 'CPU').replace('(R)', '')}, {device}" if m else device


def results_table(results_dir: Path = RESULTS_DIR) -> str:
    """The README's results table (Markdown) from the committed benchmark results."""
    head = ("| dataset | evaluated on | template(s) | template only | registration only | ANTs SyN | stage one | stage two | "
            "full supervision | machine | result file |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for key, name, file in RESULTS:
        path = results_dir / file if file else None
        if path is not None and path.exists():
            r = json.loads(path.read_text())
            if "dice_stage1" in r:  # stage2.py: held-out test volumes, networks evaluated there
                where = f"{len(r.get('test_ids', []))} held-out test volumes (pool of {r['pool_size']})"
                cells = [r.get("dice_template_only"), None, r.get("dice_ants_syn"), r["dice_stage1"], r.get("dice_final"),
                         r.get("dice_full_supervision")]
            else:  # atlas_bench: the pool is its own test set
                where = f"its pool of {r['pool_size']} volumes"
                cells = [None, r.get("registration_only_dice"), r.get("ants_syn_dice"), r.get("stage1_dice"), r.get("final_dice"), None]
            rows.append(f"| {name} | {where} | {r['template']} | " + " | ".join(_num(c) for c in cells) +
                        f" | {_machine(r)} | `{file}` |")
        matrix = results_dir / f"matrix_{key}.json"
        if matrix.exists():
            m = json.loads(matrix.read_text())
            spread = m.get("stage1_dice_spread")
            spread = spread.get("std") if isinstance(spread, dict) else spread  # the std over templates
            targets = m.get("pool_per_template")
            targets = targets.get("targets") if isinstance(targets, dict) else targets
            done = "" if m.get("complete", True) else f" (partial: {m.get('cases_done')} of {m.get('cases_total')} cases)"
            where = f"{targets} targets per template, mean of {len(m['templates'])} templates{done}"
            cells = [None, m.get("registration_only_dice_mean"), m.get("ants_syn_dice_mean"), m.get("stage1_dice_mean"),
                     m.get("final_dice_mean"), None]
            stage1 = _num(cells[3]) + (f" ± {spread:.3f}" if isinstance(spread, (int, float)) else "")
            rows.append(f"| {name} | {where} | {', '.join(m['templates'])} | " + " | ".join(
                [_num(cells[0]), _num(cells[1]), _num(cells[2]), stage1, _num(cells[4]), _num(cells[5])]) +
                        f" | {_machine(m)} | `{matrix.name}` |")
    return head + "\n" + "\n".join(rows)


def options_table() -> str:
    """The operator options (``--conf KEY VALUE``) with defaults, from :class:`~semisam_o1.config.AppConfig`."""
    defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(AppConfig)}
    rows = [f"| `{k}` | {f'`{as_text(defaults[k])}`' if defaults[k] not in ('', {}) else 'none'} | {h} |" for k, h in OPTIONS]
    return "| option | default | what it sets |\n|---|---|---|\n" + "\n".join(rows)


def params_table() -> str:
    """The research settings (``--set SECTION.FIELD=VALUE``) with defaults and the comment of their dataclass field."""
    rows = [f"| `{r['key']}` | `{r['default']}` | {_short(r['help'])} |" for r in research_settings()]
    return "| setting | default | what it sets |\n|---|---|---|\n" + "\n".join(rows)


def _short(text: str, limit: int = 300) -> str:
    """``text`` cut after its last sentence or clause that ends within ``limit`` characters (the full text:
    ``python main.py params``)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(". ", 0, limit), text.rfind("; ", 0, limit))
    return text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."


TABLES = {"results": results_table, "options": options_table, "params": params_table}


def render_readme(text: str) -> str:
    """``text`` with every generated table between its markers rewritten (other text unchanged).

    Raises:
        ValueError: a table's markers are missing.
    """
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text
