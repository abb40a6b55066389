"""The public API of jaxopt_suite, module by module, and the API pages written from it.

A module's public names are its ``__all__`` where it has one, otherwise every name bound at the
top level of its source (``def``, ``class``, assignment) that does not start with ``_``.
``conf.py`` writes one page per module into ``api/``; ``tests/test_docs.py`` checks the built
site against these names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path

# The public modules, in the order of the API index.
MODULES = (
    "jaxopt_suite",
    "jaxopt_suite.harness",
    "jaxopt_suite.prox",
    "jaxopt_suite.autosize",
    "jaxopt_suite.curvature",
    "jaxopt_suite.curvature.products",
    "jaxopt_suite.precondition",
    "jaxopt_suite.kronecker",
    "jaxopt_suite.fwdgrad",
    "jaxopt_suite.proxprop",
    "jaxopt_suite.privacy",
    "jaxopt_suite.sharding",
    "jaxopt_suite.train_state",
    "jaxopt_suite.harness.train",
    "jaxopt_suite.harness.data",
    "jaxopt_suite.harness.zoo",
    "jaxopt_suite.harness.recipes",
    "jaxopt_suite.harness.benchmarking",
    "jaxopt_suite.harness.cli",
    "jaxopt_suite.harness.reproduce",
)


def _top_level_names(module: types.ModuleType) -> list[str]:
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def public_names(module_name: str) -> list[str]:
    """The public names of a module (see the module docstring), in source or ``__all__`` order."""
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    return list(exported) if exported is not None else _top_level_names(module)


def comment_above(module_name: str, name: str) -> list[str]:
    """The ``#`` comment lines right above the top-level assignment of ``name``, as text."""
    module = importlib.import_module(module_name)
    source = Path(inspect.getfile(module)).read_text().splitlines()
    for node in ast.parse("\n".join(source)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            comment = []
            for line in reversed(source[: node.lineno - 1]):
                if not line.startswith("#"):
                    break
                comment.insert(0, line.lstrip("#").strip())
            return comment
    return []


def home(module_name: str, name: str) -> str:
    """Where the entry of ``module_name.name`` is: a public module's name that another public
    module re-exports (``jaxopt_suite.forward_grad``) is documented where it is defined."""
    value = getattr(importlib.import_module(module_name), name)
    if isinstance(value, types.ModuleType):
        return value.__name__
    defined_in = getattr(value, "__module__", None)
    if defined_in != module_name and defined_in in MODULES and name in public_names(defined_in):
        return f"{defined_in}.{name}"
    return f"{module_name}.{name}"


def _directive(module_name: str, name: str) -> str:
    value = getattr(importlib.import_module(module_name), name)
    target = home(module_name, name)
    if isinstance(value, types.ModuleType):
        return f"* :mod:`{module_name}.{name} <{target}>`"
    if target != f"{module_name}.{name}":
        role = "class" if inspect.isclass(value) else "func"
        return f"* :{role}:`{module_name}.{name} <{target}>`"
    if inspect.isclass(value):
        return f".. autoclass:: {target}\n   :members:"
    if callable(value):
        return f".. autofunction:: {target}"
    # Short values (a tuple of names) are shown; long ones (a registry) are not.
    no_value = "\n   :no-value:" if len(repr(value)) > 160 else ""
    return f".. autodata:: {target}{no_value}"


def write_pages(directory: Path) -> None:
    """Writes ``index.rst`` and one ``<module>.rst`` per public module into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for module_name in MODULES:
        names = public_names(module_name)
        links = [n for n in names if home(module_name, n) != f"{module_name}.{n}"]
        others = [n for n in names if n not in links]
        title = f"``{module_name}``"
        lines = [title, "=" * len(title), "", f".. automodule:: {module_name}", ""]
        if links:
            lines += ["Modules and names documented on their own pages:", ""]
            lines += [_directive(module_name, n) for n in links] + [""]
        for name in others:
            lines += [_directive(module_name, name), ""]
        (directory / f"{module_name}.rst").write_text("\n".join(lines))
        entries.append(f"   {module_name}")
    index = ["API reference", "=============", "", ".. toctree::", "   :maxdepth: 1", ""]
    (directory / "index.rst").write_text("\n".join(index + entries) + "\n")
