"""The library's layout rules (README, "Layout"): modules of at most about 600 lines and
functions of at most about 80, unless a ``# Long on purpose: <why>`` comment stands beside
them (a module's before its first def or class, a function's on the three lines right above
it: one function's reason does not excuse its module); the benchmark and
peer harness (``src/qctfea_bench``) outside the library, which never imports it; no module
imports another's private names (``_name``): a helper used by two modules is public in one
of them. Measured with Python's own parser, so a module or function that grows past its
limit without a reason, or a private import, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qctfea"
MODULE_LINES = 600
FUNCTION_LINES = 80
REASON = "# Long on purpose"
#: Lines right above a function in which its reason stands
ABOVE = 3

MODULES = sorted(SRC.rglob("*.py"))


def _functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_the_library_has_modules_and_functions_to_measure():
    """The checks below read real code: the library's packages by stage are there."""
    packages = {p.parent.name for p in MODULES}
    assert {"imaging", "model", "fea", "cohort", "qc", "steps"} <= packages, packages
    assert sum(1 for m in MODULES for _ in _functions(ast.parse(m.read_text()))) > 300


def _first_line(node: ast.stmt) -> int:
    """A def's or class's first line (its first decorator's)."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _problems(text: str) -> list[str]:
    """What breaks the layout rules in one module's source text."""
    lines = text.splitlines()
    tree = ast.parse(text)
    problems = []
    # the module's reason: above its first def or class, and not one of the lines right
    # above that def (those are its function's reason)
    defs = [_first_line(n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    header = lines[:max(min(defs) - 1 - ABOVE, 0)] if defs else lines
    if len(lines) > MODULE_LINES and not any(ln.startswith(REASON) for ln in header):
        problems.append(f"{len(lines)} lines (limit {MODULE_LINES}) and no '{REASON}: ...' "
                        "comment before its first def or class")
    for fn in _functions(tree):
        first = _first_line(fn)
        length = fn.end_lineno - fn.lineno + 1
        above = lines[max(first - 1 - ABOVE, 0):first - 1]  # the lines right above the def
        if length > FUNCTION_LINES and not any(ln.strip().startswith(REASON) for ln in above):
            problems.append(f"{fn.name} (line {fn.lineno}): {length} lines (limit "
                            f"{FUNCTION_LINES}) and no '{REASON}: ...' comment above it")
    return problems


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_a_long_module_or_function_says_why(module):
    problems = _problems(module.read_text())
    assert not problems, f"{module.relative_to(SRC)}: " + "; ".join(problems)


def test_the_rule_catches_a_long_function_or_module_without_a_reason():
    """The check itself, on made-up sources: an 81-line function fails it and an 80-line one
    passes; with a reason above it the 81-line one passes; a 601-line module fails it unless
    a reason stands before its first def or class: a function's reason (right above it, the
    first def or a later one) is not the module's."""
    def fn(n, reason=""):
        body = "\n".join(f"    x{i} = {i}" for i in range(n - 1))
        return f"{reason}def f():\n{body}\n"
    assert _problems(fn(80)) == []
    assert [p.split(":")[0] for p in _problems(fn(81))] == ["f (line 1)"]
    assert _problems(fn(81, f"{REASON}: one algorithm in order.\n")) == []
    long_module = "\n".join(f"x{i} = {i}" for i in range(601))
    assert _problems(long_module)[0].startswith("601 lines (limit 600)")
    assert _problems(f"{REASON}: one stage.\n" + long_module) == []
    with_defs = "\n".join(f"x{i} = {i}" for i in range(596)) + "\n"
    with_defs += f"\n\n{REASON}: one algorithm.\ndef f():\n    pass\n"
    assert _problems(with_defs)[0].startswith("601 lines (limit 600)")
    later = f'"""Doc."""\n\n\ndef g():\n    pass\n\n\n{REASON}: one algorithm.\n' + with_defs
    assert _problems(later)[0].startswith("609 lines (limit 600)")
    assert _problems(f'"""Doc."""\n{REASON}: one stage.\n\n\n' + later) == []


def test_the_harness_lives_outside_the_library():
    """Benchmarks, peer comparisons and throughput runs are tools, not science: no module of
    the library is named after them, and none imports the harness package or the tools."""
    harness = {"perf", "peer", "peer_driver", "throughput", "convergence", "benchmarks"}
    assert (SRC.parent / "qctfea_bench").is_dir()
    assert not [m for m in MODULES if m.stem in harness]
    for m in MODULES:
        for node in ast.walk(ast.parse(m.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                assert not any(n.split(".")[0] in ("qctfea_bench", "tools") for n in names), m


def _private_imports(text: str, package: str = "qctfea") -> list[str]:
    """The private names (``_name``, not ``__dunder__``) one module's source imports from
    the library: ``from qctfea.x import _y``, ``from .x import _y``, or ``m._y`` with ``m``
    a library module imported by ``import qctfea.x as m`` or ``from qctfea import x``."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found, modules = [], set()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").split(".")[0] == package):
            where = "." * node.level + (node.module or "")
            for alias in node.names:
                if private(alias.name):
                    found.append(f"line {node.lineno}: from {where} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_another_modules_private_names(module):
    found = _private_imports(module.read_text())
    assert not found, f"{module.relative_to(SRC)} uses private names of other modules: " + \
        "; ".join(found) + " (make the helper public, or move it to the module that uses it)"


def test_the_rule_catches_a_private_import():
    """The check itself, on made-up sources: absolute, relative and attribute uses of a
    private name are caught; public names, dunders, a private alias of a public name and
    private names of other packages are not."""
    assert sorted(f.split(": ")[1] for f in _private_imports(
        "from qctfea.imaging.dicomslices import Slice, _named\n"
        "from .slicegeometry import _format_gaps\n"
        "from . import _tags\n"
        "from qctfea.imaging import calibration\n"
        "import qctfea.cohort.longtable as lt\n"
        "x = calibration._uncertainty(1) + lt._check_metrics\n")) == [
        "calibration._uncertainty", "from . import _tags",
        "from .slicegeometry import _format_gaps",
        "from qctfea.imaging.dicomslices import _named", "lt._check_metrics"]
    assert _private_imports(
        "from qctfea import __version__\n"
        "from qctfea.config import main as _main\n"
        "from numpy import _globals\n"
        "import numpy as np\n"
        "x = np._NoValue\n"
        "self._bc = 1\n") == []
