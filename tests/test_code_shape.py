"""The shape of the code (issue 21), checked on the source tree itself, statically (no module is
imported but in the torch check): modules under curate/ stay under 500 lines; no private name
crosses modules (neither `from X import _y` nor `X._y` on an imported module); no import cycle
between the project's modules, counting imports inside functions and the package `__init__`s an
import runs; importing the curate package and the CLI never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("curate", "train", "tools")
MAX_LINES = 500  # curate/ modules (issue 21)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _is_package(name: str) -> bool:
    return _modules()[name][0].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, str | None, bool]]:
    """(module imported, name taken from it or None, at module level) for every import of a
    project module in `name`'s source; `from pkg import sub` counts as importing pkg.sub."""
    tree = _modules()[name][1]
    top = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                                       for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, None, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, node)
            if module and module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    if sub in _modules():
                        found.append((sub, None, id(node) in top))
                    else:
                        found.append((module, alias.name, id(node) in top))
    return found


def test_no_curate_module_over_500_lines():
    long = {str(path.relative_to(ROOT)): n for name, (path, _) in _modules().items()
            if name.startswith("curate") and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_name_crosses_modules():
    crossings = []
    for name, (path, tree) in _modules().items():
        bound: dict[str, str] = {}  # local name -> project module it refers to
        for module, taken, _ in _imports(name):
            if taken is not None and taken.startswith("_") and not taken.startswith("__"):
                crossings.append(f"{path.relative_to(ROOT)}: from {module} import {taken}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(name, node)
                for alias in node.names:
                    if module and f"{module}.{alias.name}" in _modules():
                        bound[alias.asname or alias.name] = f"{module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = ast.unparse(node.value)
                if target in bound and bound[target] != name:
                    crossings.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}.{node.attr}")
    assert not crossings, "private names used across modules:\n" + "\n".join(crossings)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles():
    """Every import counts (inside functions too: a cycle hidden in a function is still one).
    Importing a.b.c at module level also runs the `__init__` of a and a.b, unless the importer
    lives inside that package (its own package is already being imported): a module outside
    curate/stages importing one stage module runs the stage registry."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name in modules:
        for module, _, top in _imports(name):
            if module not in modules:
                continue
            if module != name:
                edges[name].add(module)
            if top:
                parts = module.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not (name + ".").startswith(parent + ".") and parent != name:
                        edges[name].add(parent)
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_a_run_without_a_global_pass_never_loads_dask_dataframe():
    """The driver and the workers of a run of row stages only (the download path) skip
    dask.dataframe's ~0.9 s of import: it loads where a global pass reads its rows."""
    code = ("import sys, curate.stages, curate.sources, curate.engine.driver, curate.engine.steps; "
            "print('dask.dataframe' in sys.modules); raise SystemExit('dask.dataframe' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_curate_and_the_cli_never_load_torch():
    code = ("import sys, curate.stages, curate.sources, curate.engine.driver, curate.engine.retry, tools.cli; "
            "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules); "
            "print(heavy); raise SystemExit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def _local_import_groups(tree: ast.Module) -> list[list[ast.stmt]]:
    """The imports inside functions and classes (not the module's own, nor those under a
    module-level `if`/`try`), in runs of consecutive lines."""
    top = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                                       for n in ast.walk(stmt)}
    local = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top),
                   key=lambda n: n.lineno)
    groups: list[list[ast.stmt]] = []
    for node in local:
        if groups and node.lineno == groups[-1][-1].end_lineno + 1:
            groups[-1].append(node)
        else:
            groups.append([node])
    return groups


def test_imports_inside_functions_say_why():
    """Imports sit at the module's top. One inside a function is for a heavy optional dependency
    (torch, open_clip, transformers, a benchmark's peer...), the CLI's start-up, or to keep
    torch out of curate/: a comment on the import (or the line above a run of them) says which."""
    silent = []
    for name, (path, tree) in _modules().items():
        lines = path.read_text().splitlines()
        for group in _local_import_groups(tree):
            span = range(group[0].lineno - 1, group[-1].end_lineno)
            above = lines[group[0].lineno - 2].strip() if group[0].lineno > 1 else ""
            if not any("#" in lines[i] for i in span) and not above.startswith("#"):
                silent.append(f"{path.relative_to(ROOT)}:{group[0].lineno}: {ast.unparse(group[0])}")
    assert not silent, f"{len(silent)} imports inside functions without a reason:\n" + "\n".join(silent)
