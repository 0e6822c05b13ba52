"""Import cycles inside megatron_align, from the source alone (``ast``; nothing is imported).

Prints the strongly connected components of the package's import graph three ways:

- every import, ``if TYPE_CHECKING:`` ones too: the circle a reader follows;
- run-time imports (module-level and inside functions, not ``TYPE_CHECKING``): what can execute;
- module-level imports only: what runs at import time, where a cycle is a bug waiting for an
  import order.

``tests/test_import_graph.py`` fails on a cycle of the last two kinds; the package has none of the first kind
either (callbacks see the trainer through the ``TrainerView`` protocol).

    python tools/import_cycles.py [--package-dir megatron_align]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys


def module_names(package_dir: str) -> dict[str, str]:
    """Dotted module name -> file path, for every .py under ``package_dir``."""
    root = os.path.dirname(os.path.abspath(package_dir))
    modules = {}
    for folder, _dirs, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool, functions: bool, type_checking: bool):
    """Yield the dotted names ``module`` imports (targets of ``import x`` and ``from x import y``)."""
    def visit(nodes, top):
        for node in nodes:
            if isinstance(node, ast.Import) and top:
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and top:
                base = node.module or ""
                if node.level:
                    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.body, top and type_checking)
                yield from visit(node.orelse, top)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.Try, ast.With,
                                   ast.For, ast.While)):
                inner = top and (functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, [])
                    for child in children:
                        yield from visit(
                            getattr(child, "body", []) if isinstance(child, ast.ExceptHandler) else [child], inner
                        )
    yield from visit(tree.body, True)


def import_graph(package_dir: str, functions: bool = True, type_checking: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports (importing ``a.b.c`` also runs ``a`` and ``a.b``).

    ``functions``: count imports inside functions; ``type_checking``: count ``if TYPE_CHECKING:`` ones.
    """
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for name in _imports(tree, module, path.endswith("__init__.py"), functions, type_checking):
            while name and name not in modules:
                name = name.rpartition(".")[0]  # `from pkg.mod import function` -> pkg.mod
            while name:
                if name != module and not module.startswith(name + "."):
                    targets.add(name)  # importing a.b.c runs a/__init__ and a/b/__init__ first
                name = name.rpartition(".")[0]
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found, key=len, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "megatron_align")
    parser.add_argument("--package-dir", default=os.path.normpath(default))
    args = parser.parse_args(argv)
    status = 0
    for label, functions, type_checking in (("every import (TYPE_CHECKING too)", True, True),
                                            ("run-time imports (module level and in functions)", True, False),
                                            ("module-level imports", False, False)):
        found = cycles(import_graph(args.package_dir, functions, type_checking))
        print(f"{label}: {len(found)} cycle(s)" + (f", largest {len(found[0])} modules" if found else ""))
        for component in found:
            print(f"  {len(component)}: {' '.join(component)}")
        if found and not type_checking:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
