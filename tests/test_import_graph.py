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


def _area(module: str) -> str:
    """``megatron_align.data.prepare`` -> ``data``: the room a module belongs to (architecture.md)."""
    return module.split(".")[1] if module.count(".") else module


def test_no_module_level_import_cycle():
    found = import_cycles.cycles(import_cycles.import_graph(PACKAGE, functions=False, type_checking=False))
    assert found == [], f"import cycle(s) in megatron_align (see tools/import_cycles.py): {found}"


def test_no_run_time_import_cycle_between_areas():
    """Areas import each other in one direction, also through function-level imports (the old 27-module circle ran
    through training, resilience, eval, tracking and config). Inside one area a verb and its driver may refer to each
    other lazily (``data.prepare`` hands work to ``data.pipeline``, whose datatrove step calls ``prepare``'s core)."""
    found = import_cycles.cycles(import_cycles.import_graph(PACKAGE, functions=True, type_checking=False))
    across = [cycle for cycle in found if len({_area(m) for m in cycle}) > 1]
    assert across == [], f"run-time import cycle(s) across areas (see tools/import_cycles.py): {across}"


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


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_ranks_and_the_supervisor_import_nothing_of_each_other():
    """resilience/inrank and resilience/supervisor share only the top-level vocabulary (module-level imports).
    The supervisor's config dataclasses are part of the root config, so every rank loads them: that is allowed."""
    graph = import_cycles.import_graph(PACKAGE, functions=False, type_checking=False)
    inrank = {m for m in graph if m.startswith("megatron_align.resilience.inrank")}
    supervisor = {m for m in graph if m.startswith("megatron_align.resilience.supervisor")}
    assert inrank and supervisor
    for module in sorted(supervisor):
        reached = _reach(graph, module)
        assert not reached & (inrank | {"megatron_align.training.trainer"}), (module, sorted(reached & inrank))
    supervisor_code = supervisor - {"megatron_align.resilience.supervisor", "megatron_align.resilience.supervisor.config"}
    for module in sorted(inrank):
        assert not _reach(graph, module) & supervisor_code, (module, sorted(_reach(graph, module) & supervisor_code))


def test_config_fault_grammar_supervisor_and_spawner_import_without_torch():
    import subprocess
    import sys

    modules = ["megatron_align.config", "megatron_align.resilience.faults",
               "megatron_align.resilience.supervisor.supervisor", "megatron_align.parallel.spawn",
               "megatron_align.training.launch"]  # the process that spawns ranks stays light
    code = f"import sys\nfor m in {modules!r}:\n    __import__(m)\nprint(sorted(k for k in sys.modules if k == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
