"""Sphinx configuration: ``make docs`` (``sphinx -W``) builds the site into docs/_build/html.

Pages in docs/ include README sections and BENCHMARKS.md from the repository root, so each text
has one source. Files that Sphinx must see as documents but that live outside docs/ (the
notebooks, BENCHMARKS.md and the benchmark results it links) are copied into docs/ at the start
of every build, at the same relative paths, so the links between them keep working. Notebooks
are rendered with their stored outputs and never executed here.
"""

from __future__ import annotations

import inspect
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS)]

import api_pages  # noqa: E402  (needs the paths above)

import jaxopt_suite  # noqa: E402


def _copy_sources() -> None:
    for generated in ("notebooks", "benchmarks", "BENCHMARKS.md", "api"):
        path = DOCS / generated
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    # The result reports become pages under the summary (in its part of the sidebar).
    toctree = "\n\n```{toctree}\n:hidden:\n:glob:\n\nbenchmarks/results/*\n```\n"
    (DOCS / "BENCHMARKS.md").write_text((ROOT / "BENCHMARKS.md").read_text() + toctree)
    results = ROOT / "benchmarks" / "results"
    # Pages need a title; a bare table (scaling/table.md) stays a file of the repository.
    pages = [p for p in results.glob("**/*.md") if p.read_text().startswith("# ")]
    for source in [*pages, *results.glob("*/*.png")]:
        target = DOCS / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (DOCS / "notebooks").mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy2(notebook, DOCS / "notebooks" / notebook.name)
    api_pages.write_pages(DOCS / "api")


_copy_sources()

project = "jaxopt_suite"
author = "jaxopt_suite developers"
copyright = "2026, jaxopt_suite developers"
release = version = jaxopt_suite.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static: formulas render offline too
]
exclude_patterns = ["_build", "README.md", "**/parts/**", "**/run*/**"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# Benchmark reports skip heading levels (## then ####) for compact sections; they render fine.
suppress_warnings = ["myst.header"]
nb_execution_mode = "off"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"jaxopt_suite {release}"
html_static_path = ["_static"]
html_css_files = ["tables.css"]


# Docstrings are written for ``help()`` as much as for Sphinx: a star that starts a word and is
# never closed on its line (``*leaf`` in a shape, ``**kwargs`` among several argument names)
# is text there, while reStructuredText reads it as the start of emphasis. Outside inline
# literals and roles, such a star is escaped.
_LITERAL = re.compile(r"(``.*?``|:\w+:`[^`]*`)")
_OPENER = re.compile(r"(?<![^\s(,\[])(\*{1,2})(?=\w)")
_CLOSER = re.compile(r"(?<=[^\s*])\*")


def _escape_unclosed_stars(line: str) -> str:
    parts = _LITERAL.split(line)  # text at even indices, literals and roles at odd ones
    for i in range(0, len(parts), 2):
        later_text = "".join(parts[i + 2 :: 2])
        part, out, pos = parts[i], [], 0
        for match in _OPENER.finditer(part):
            if _CLOSER.search(part[match.end() :]) or _CLOSER.search(later_text):
                continue
            out.append(part[pos : match.start()] + match.group(1).replace("*", "\\*"))
            pos = match.end()
        parts[i] = "".join(out) + part[pos:]
    return "".join(parts)


def _process_docstring(app, what, name, obj, options, lines):
    own = "\n".join(lines).split()
    inherited = inspect.getdoc(type(obj)) if what in ("data", "attribute") else None
    if inherited and own == inherited.split():
        # a constant has no docstring of its own: the comment above its assignment says what
        # it is (not its type's docstring)
        module_name, _, constant = name.rpartition(".")
        lines[:] = api_pages.comment_above(module_name, constant)
    lines[:] = [_escape_unclosed_stars(line) for line in lines]


def _skip_member(app, what, name, obj, skip, options):
    # NamedTuple fields are documented in the class docstring's Attributes section.
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return skip


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
