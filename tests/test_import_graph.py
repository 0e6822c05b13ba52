"""The package's import graph has no cycle that can execute (checked from the source with ``ast``).

A cycle of module-level imports breaks on some import order; a cycle through function-level
imports is how the old 27-module circle hid (``build_callbacks`` in the ``Callback`` module,
the fault grammar behind the ``Callback`` import) and why the builders could not be typed.
``python tools/import_cycles.py`` prints the cycles.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("import_cycles", os.path.join(REPO, "tools", "import_cycles.py"))
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)
PACKAGE = os.path.join(REPO, "megatron_align")


@pytest.mark.parametrize("functions", [False, True], ids=["module-level", "run-time"])
def test_no_import_cycle(functions):
    found = import_cycles.cycles(import_cycles.import_graph(PACKAGE, functions=functions, type_checking=False))
    assert found == [], f"import cycle(s) in megatron_align (see tools/import_cycles.py): {found}"


def test_the_graph_sees_function_level_and_type_only_imports(tmp_path):
    """The checker itself: a cycle closed by a function-level import counts as run-time, one closed by
    ``if TYPE_CHECKING:`` only as type-only, and ``from pkg import module`` resolves to the module."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import y\n")
    (pkg / "d.py").write_text("from pkg.c import z\n")
    assert import_cycles.cycles(import_cycles.import_graph(str(pkg), functions=False, type_checking=False)) == []
    assert import_cycles.cycles(import_cycles.import_graph(str(pkg), functions=True, type_checking=False)) == \
        [["pkg.a", "pkg.b"]]
    assert sorted(import_cycles.cycles(import_cycles.import_graph(str(pkg)))) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
