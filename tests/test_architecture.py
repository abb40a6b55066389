"""The library never imports the harness: ``jaxopt_suite.harness`` imports the library, not back.

Library modules are every module of the package except ``jaxopt_suite.harness*`` and the
modules that exist to reach the harness: the compatibility aliases of its modules under their
former names and ``python -m jaxopt_suite``.
"""

from __future__ import annotations

import ast
import pathlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator

import jaxopt_suite

PACKAGE_DIR = pathlib.Path(jaxopt_suite.__file__).parent
HARNESS = "jaxopt_suite.harness"
COMPATIBILITY_ALIASES = frozenset(
    f"jaxopt_suite.{name}" for name in ("train", "zoo", "data", "benchmarking", "cli", "methods")
)
HARNESS_ENTRY_POINTS = COMPATIBILITY_ALIASES | {"jaxopt_suite.__main__"}


def _walk(path: pathlib.Path, prefix: str) -> Iterator[tuple[str, pathlib.Path]]:
    """(module name, source file) of every module under ``path``, importing none of them
    (``pkgutil.walk_packages`` imports each package to find its submodules)."""
    for info in pkgutil.iter_modules([str(path)], prefix):
        leaf = info.name.rsplit(".", 1)[1]
        if info.ispkg:
            yield info.name, path / leaf / "__init__.py"
            yield from _walk(path / leaf, info.name + ".")
        else:
            yield info.name, path / f"{leaf}.py"


def _is_harness(name: str) -> bool:
    return name == HARNESS or name.startswith(HARNESS + ".")


def library_modules() -> dict[str, pathlib.Path]:
    found = {
        "jaxopt_suite": PACKAGE_DIR / "__init__.py",
        **dict(_walk(PACKAGE_DIR, "jaxopt_suite.")),
    }
    return {
        name: path
        for name, path in found.items()
        if not _is_harness(name) and name not in HARNESS_ENTRY_POINTS
    }


def test_the_walk_finds_the_library_and_leaves_out_the_harness():
    names = set(library_modules())
    expected = {
        "jaxopt_suite",
        "jaxopt_suite._src.alig",
        "jaxopt_suite._src.proximal",
        "jaxopt_suite.autosize",
        "jaxopt_suite.curvature",
        "jaxopt_suite.fwdgrad.interpreter",
        "jaxopt_suite.kronecker",
        "jaxopt_suite.precondition",
        "jaxopt_suite.proxprop.ops",
        "jaxopt_suite.sharding",
    }
    assert expected <= names
    assert not any(_is_harness(n) for n in names)
    assert not names & HARNESS_ENTRY_POINTS


def test_importing_every_library_module_loads_no_harness_module():
    names = sorted(library_modules())
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {names!r}:",
            "    importlib.import_module(name)",
            f"    loaded = sorted(m for m in sys.modules if m == {HARNESS!r}"
            f" or m.startswith({HARNESS + '.'!r}))",
            "    if loaded:",
            "        sys.exit(f'importing {name} loaded the harness: {loaded}')",
        ]
    )
    # run from the directory above the package, so the child imports this same package
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE_DIR.parent
    )
    assert out.returncode == 0, out.stderr


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module an ``import`` statement anywhere in ``tree`` (functions included) names,
    with ``from a import b`` giving both ``a`` and ``a.b``, and every literal argument of
    ``importlib.import_module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def test_no_library_source_imports_the_harness():
    """Also catches imports inside functions, which importing the module does not run."""
    offenders = []
    for name, path in library_modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported in _imported_modules(tree, name, path.name == "__init__.py"):
            if _is_harness(imported) or imported in HARNESS_ENTRY_POINTS:
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders
