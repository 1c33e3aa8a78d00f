"""The worked examples in the library's docstrings are specifications: each one runs and holds."""

import doctest
import importlib
import pkgutil

import pytest
import semisam_o1

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    names = sorted(m.name for m in pkgutil.walk_packages(semisam_o1.__path__, "semisam_o1."))
    finder = doctest.DocTestFinder()
    return [n for n in names if any(t.examples for t in finder.find(importlib.import_module(n)))]


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=FLAGS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (see the output above)"
