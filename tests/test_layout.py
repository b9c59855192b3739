"""The package's layout holds: no import cycle between its modules, and no module importing another
module's underscore names.

The imports are read with `ast`, all of them: those inside functions too (a lazy import that closes
a cycle is still a cycle, only one that fails later and less clearly). Imports under
`if TYPE_CHECKING:` never run and make no cycle, but still may not name another module's private
names. An import names a module (`magistral_jax.a.b`) or a name of one; the packages above the
module named (`magistral_jax.a`) are not counted, since importing a submodule of a package that is
still initialising works.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

PACKAGE = "magistral_jax"
ROOT = os.path.join(os.path.dirname(__file__), os.pardir, PACKAGE)


@dataclass(frozen=True)
class Import:
    """One imported module (and the name taken from it, if any), where the import is written."""

    source: str  # the importing module
    target: str  # the module imported from
    name: str | None  # the name imported from `target` (None: the module itself)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def module_files(root: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every module under `root` (a package's `__init__.py` is the
    package itself)."""
    out = {}
    for directory, _, files in os.walk(root):
        for fname in files:
            if not fname.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(directory, fname), root)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join([package, *rel])] = os.path.join(directory, fname)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, path: str, modules: set[str], package: str) -> list[Import]:
    """The imports of `module` (file `path`) that name modules of `package`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append(Import(module, alias.name, None, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, `level` dots up
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == package or base.startswith(package + "."):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        found.append(Import(module, sub, None, node.lineno, type_only))
                    else:
                        found.append(Import(module, base, alias.name, node.lineno, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def package_imports(root: str = ROOT, package: str = PACKAGE) -> list[Import]:
    files = module_files(root, package)
    return [i for module, path in sorted(files.items()) for i in imports(module, path, set(files), package)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (the strongly
    connected components of more than one module, or one module importing itself), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    # Tarjan's algorithm, iterative (no recursion limit on a long chain of imports).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1 or node in graph[node]:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(groups)


def private_imports(edges: list[Import]) -> list[Import]:
    """Imports of another module's underscore names (dunder names such as `__version__` are public)."""
    return [
        e
        for e in edges
        if e.name is not None
        and e.name.startswith("_")
        and not (e.name.startswith("__") and e.name.endswith("__"))
        and e.target != e.source
    ]


def _describe_cycle(group: list[str], edges: list[Import]) -> str:
    inside = set(group)
    lines = sorted({(e.source, e.line, e.target) for e in edges if e.source in inside and e.target in inside})
    return ", ".join(group) + "\n" + "\n".join(f"    {s}:{line} imports {t}" for s, line, t in lines)


@pytest.fixture(scope="module")
def ours() -> list[Import]:
    return package_imports()


def test_no_import_cycle_between_the_package_modules(ours):
    edges = [e for e in ours if not e.type_only]
    found = cycles(edges)
    assert not found, "modules that import each other (move the shared code down, or the caller up):\n" + "\n".join(
        _describe_cycle(group, edges) for group in found
    )


def test_no_module_imports_another_modules_private_names(ours):
    found = private_imports(ours)
    assert not found, "underscore names imported from another module (make them public, or move them):\n" + "\n".join(
        f"    {e.source}:{e.line} imports {e.name} from {e.target}" for e in found
    )


# --- the checker itself, on a package written for the test -----------------------------------------


@pytest.fixture
def toy(tmp_path):
    """A package `toy` whose modules are written by the test: `write("a/b.py", text)`."""
    root = tmp_path / "toy"

    def write(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == root.parent:
                break
            (parent / "__init__.py").touch()
        path.write_text(text)

    return str(root), write


def test_a_cycle_through_a_lazy_import_is_found(toy):
    root, write = toy
    write("a.py", "from toy.b import f\n")
    write("b.py", "def f():\n    from toy.sub import c\n")
    write("sub/c.py", "import toy.a\n")
    write("d.py", "from toy import b\nfrom toy.sub.c import x\n")  # imports into the cycle, not part of it
    assert cycles(package_imports(root, "toy")) == [["toy.a", "toy.b", "toy.sub.c"]]


def test_type_only_imports_make_no_cycle_but_relative_ones_do(toy):
    root, write = toy
    write("a.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.b import B\n")
    write("b.py", "import toy.a\n")
    assert cycles([e for e in package_imports(root, "toy") if not e.type_only]) == []
    write("sub/c.py", "from .d import y\n")
    write("sub/d.py", "from ..sub import c\n")
    assert cycles([e for e in package_imports(root, "toy") if not e.type_only]) == [["toy.sub.c", "toy.sub.d"]]


def test_underscore_names_of_another_module_are_found(toy):
    root, write = toy
    write("a.py", "def _own():\n    pass\n")
    write("b.py", "from toy.a import _own, __doc__\nfrom toy import a\n")
    write("sub/__init__.py", "from toy.sub.c import _helper\n")
    write("sub/c.py", "def _helper():\n    pass\n")
    found = {(e.source, e.target, e.name) for e in private_imports(package_imports(root, "toy"))}
    assert found == {("toy.b", "toy.a", "_own"), ("toy.sub", "toy.sub.c", "_helper")}
