"""The package's import graph has no cycle that can execute (checked from the source with ``ast``).

A cycle of module-level imports breaks on some import order; a cycle through function-level
imports is how the old 27-module circle hid (``build_callbacks`` in the ``Callback`` module,
the fault grammar behind the ``Callback`` import) and why the builders could not be typed.
``python tools/import_cycles.py`` prints the cycles.
"""

from __future__ import annotations

import importlib.util
import os

from conftest import REPO

_spec = importlib.util.spec_from_file_location("import_cycles", os.path.join(REPO, "tools", "import_cycles.py"))
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)
PACKAGE = os.path.join(REPO, "megatron_align")


def _area(module: str) -> str:
    """``megatron_align.corpus.prepare`` -> ``data``: the room a module belongs to (architecture.md)."""
    return module.split(".")[1] if module.count(".") else module


def test_no_module_level_import_cycle():
    found = import_cycles.cycles(import_cycles.import_graph(PACKAGE, functions=False, type_checking=False))
    assert found == [], f"import cycle(s) in megatron_align (see tools/import_cycles.py): {found}"


def test_no_run_time_import_cycle_between_areas():
    """Areas import each other in one direction, also through function-level imports (the old 27-module circle ran
    through training, resilience, eval, tracking and config). Inside corpus/ and data/ there is none at all: a corpus
    verb hands the pipeline runner its shard and merge functions, so the runner never imports a verb."""
    found = import_cycles.cycles(import_cycles.import_graph(PACKAGE, functions=True, type_checking=False))
    across = [cycle for cycle in found if len({_area(m) for m in cycle}) > 1]
    assert across == [], f"run-time import cycle(s) across areas (see tools/import_cycles.py): {across}"
    inside = [cycle for cycle in found if {_area(m) for m in cycle} & {"corpus", "data"}]
    assert inside == [], f"run-time import cycle(s) in corpus/ or data/: {inside}"


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
    assert sorted(import_cycles.cycles(import_cycles.import_graph(str(pkg)))) == [
        ["pkg.a", "pkg.b"],
        ["pkg.c", "pkg.d"],
    ]


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_ranks_and_the_supervisor_import_nothing_of_each_other():
    """resilience/inrank and resilience/supervisor share only resilience/protocol (module-level imports); their
    config dataclasses live in config/resilience.py, which every rank loads."""
    graph = import_cycles.import_graph(PACKAGE, functions=False, type_checking=False)
    inrank = {m for m in graph if m.startswith("megatron_align.resilience.inrank")}
    supervisor = {m for m in graph if m.startswith("megatron_align.resilience.supervisor")}
    assert inrank and supervisor
    for module in sorted(supervisor):
        reached = _reach(graph, module)
        assert not reached & (inrank | {"megatron_align.training.trainer"}), (module, sorted(reached & inrank))
    supervisor_code = supervisor - {"megatron_align.resilience.supervisor"}
    for module in sorted(inrank):
        assert not _reach(graph, module) & supervisor_code, (module, sorted(_reach(graph, module) & supervisor_code))


def test_config_fault_grammar_supervisor_and_spawner_import_without_torch():
    import subprocess
    import sys

    modules = [
        "megatron_align.config",
        "megatron_align.resilience.protocol.faults",
        "megatron_align.resilience.supervisor.supervisor",
        "megatron_align.cli.launch",
        "megatron_align.parallel.spawn",
        "megatron_align.training.launch",
    ]  # the process that spawns ranks stays light
    code = (
        f"import sys\nfor m in {modules!r}:\n    __import__(m)\nprint(sorted(k for k in sys.modules if k == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _module_level_imports(path: str) -> set[str]:
    """Top-level names of what a file imports when it is imported (function bodies left out)."""
    import ast

    with open(path) as f:
        todo, names = [ast.parse(f.read(), path)], set()
    while todo:
        for node in ast.iter_child_nodes(todo.pop()):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            todo.append(node)
    return names


def test_the_corpus_toolkit_never_imports_torch_or_megatron():
    """corpus/ is the offline toolkit: it runs on CPU-only data nodes and in many pipeline tasks at once, so neither
    its modules nor anything they import at module level, nor its verbs' --help, may pull in torch or Megatron-Core."""
    graph = import_cycles.import_graph(PACKAGE, functions=False, type_checking=False)
    files = import_cycles.module_names(PACKAGE)
    corpus = sorted(m for m in graph if m.startswith("megatron_align.corpus"))
    assert "megatron_align.corpus.indexed" in corpus and "megatron_align.corpus.pipeline" in corpus
    for module in corpus:
        for reached in sorted(_reach(graph, module) | {module}):
            heavy = _module_level_imports(files[reached]) & {"torch", "megatron"}
            assert not heavy, f"{module} imports {reached}, which imports {heavy} at module level"
    import subprocess
    import sys

    code = (f"import sys\nfor m in {corpus!r}:\n    __import__(m)\n"
            "from megatron_align.cli import main\n"
            "for verb in (['filter'], ['tag'], ['prepare'], ['tokenizer', 'train']):\n"
            "    try:\n        main([*verb, '--help'])\n    except SystemExit as e:\n        assert e.code == 0, verb\n"
            "print('HEAVY', sorted(k for k in sys.modules if k == 'torch' or k.startswith('megatron.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: megatron-align filter" in out.stdout and "--executor" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]


def test_config_imports_no_numpy_no_torch_and_nothing_of_the_package_but_errors():
    """Loading and checking a config needs nothing heavy (``import megatron_align.config`` in a fresh process), and
    the implementation modules import their config, never the reverse (module-level imports, from the source).
    The one exception is the torch-free fault grammar, which ``resilience.faults`` is parsed with."""
    import subprocess
    import sys

    code = "import sys, megatron_align.config\nprint(sorted(k for k in ('numpy', 'torch') if k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    graph = import_cycles.import_graph(PACKAGE, functions=False, type_checking=False)
    allowed = {"megatron_align", "megatron_align.errors", "megatron_align.resilience",
               "megatron_align.resilience.protocol", "megatron_align.resilience.protocol.faults"}  # + (empty) packages
    for module in sorted(m for m in graph if m.startswith("megatron_align.config")):
        outside = {t for t in graph[module] if not t.startswith("megatron_align.config")} - allowed
        assert not outside, (module, sorted(outside))
