"""The documentation site: `make docs` builds without a warning, every public name has an entry,
and the notebooks it renders carry their stored outputs (the build never executes them)."""

import importlib
import inspect
import json
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

import jaxopt_suite

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import api_pages  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _inventory(path: Path) -> set[str]:
    """The object names in a Sphinx ``objects.inv`` (4 header lines, then zlib-compressed
    ``name domain:role priority uri display`` lines)."""
    raw = path.read_bytes()
    body = raw.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def _expected_entries() -> dict[str, set[str]]:
    """For each public module, the full names under which its public names may be documented:
    its own, or where it is defined when that is another public module (a re-export)."""
    expected = {}
    for module_name in api_pages.MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:  # functions and classes defined here (constants: api_pages' rule)
            names = [
                n
                for n, v in vars(module).items()
                if not n.startswith("_")
                and (inspect.isfunction(v) or inspect.isclass(v))
                and v.__module__ == module_name
            ]
        names = set(names) | set(api_pages.public_names(module_name))
        for name in names:
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                expected[f"{module_name}.{name}"] = {value.__name__}
            else:
                defined = f"{getattr(value, '__module__', module_name)}.{name}"
                expected[f"{module_name}.{name}"] = {f"{module_name}.{name}", defined}
    return expected


def test_public_modules_are_all_listed():
    exported = {
        getattr(jaxopt_suite, n).__name__
        for n in jaxopt_suite.__all__
        if isinstance(getattr(jaxopt_suite, n), types.ModuleType)
    }
    assert exported | {"jaxopt_suite"} <= set(api_pages.MODULES)


def test_included_readme_sections_start_after_whole_headings():
    # a partial heading would leave the rest of its line at the top of the page
    readme = (ROOT / "README.md").read_text().splitlines()
    pages = [*(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "methods").glob("*.md")]
    starts = [
        line.split(":start-after:", 1)[1].strip().strip('"')
        for page in pages
        for line in page.read_text().splitlines()
        if line.startswith(":start-after:")
    ]
    assert len(starts) >= 10
    assert not [s for s in starts if s not in readme]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_its_outputs(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in cells), "a code cell was not executed"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot stored"
    assert not [o for o in outputs if o["output_type"] == "error"]


@pytest.mark.slow
def test_site_builds_without_warnings_and_documents_every_public_name(tmp_path):
    html = tmp_path / "html"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"),
            *("-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(html)),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-5000:]

    documented = _inventory(html / "objects.inv")
    missing = [name for name, homes in _expected_entries().items() if not homes & documented]
    assert not missing, f"public names without an entry in the API pages: {missing}"

    for notebook in NOTEBOOKS:  # rendered with their stored plots
        page = (html / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "<img" in page, notebook.name
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()  # formulas render offline
    # the README's sections are included (the quick start's commands, the methods table)
    assert "installs the test extra" in (html / "getting_started.html").read_text()
    assert "GradientTransformation" in (html / "index.html").read_text()
