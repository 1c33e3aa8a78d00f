"""Imports point one way (README, Layout): core <- command line and app; nothing in the library imports the harnesses."""

import ast
from pathlib import Path

from semisam_o1 import PROJECT_ROOT

LIB = PROJECT_ROOT / "lib" / "semisam_o1"
#: Modules above the core (the command line and the app).
UPPER = {"semisam_o1.pipeline", "semisam_o1.cli", "semisam_o1.docs", "semisam_o1.server", "semisam_o1.tasks"}
HARNESSES = {"orthanc_harness", "child_process", "conftest", "atlas_bench", "common"}


def module_name(path: Path) -> str:
    return ".".join(("semisam_o1", *path.relative_to(LIB).with_suffix("").parts)).removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def is_upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


def test_core_modules_never_import_the_command_line_the_app_or_the_harnesses():
    core = [p for p in LIB.rglob("*.py") if not is_upper(module_name(p))]
    assert len(core) > 15  # the walk found the library
    wrong = {module_name(p): sorted(n for n in imported(p) if is_upper(n) or n.split(".")[0] in HARNESSES) for p in core}
    assert {m: n for m, n in wrong.items() if n} == {}


def test_an_upward_import_is_detected(tmp_path):
    # the check above reads function-level imports too (a lazy import is still an arrow)
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from semisam_o1.pipeline import run_stage_one\n")
    assert any(is_upper(n) for n in imported(source))
