"""Renders three pages of the built site in headless Chromium and saves PNG screenshots.

    python docs/screenshots.py          # after `make docs`; writes docs/_build/screenshots/

Pages: the home page, the ``curvature`` API page and a notebook with plots (forward gradient).
Needs Debian's ``chromium`` package (``apt-get install chromium``). MathJax is loaded from its
CDN, as in any Sphinx site, so the formulas render only with network access.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# page name -> (path in the site, window height: tall enough for the notebook's first plot)
PAGES = {
    "home": ("index.html", 1600),
    "curvature_api": ("api/jaxopt_suite.curvature.html", 2400),
    "notebook_forward_gradient": ("notebooks/forward_gradient.html", 4000),
}


def screenshot(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            "--virtual-time-budget=15000",  # let MathJax typeset before the capture
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=DOCS / "_build" / "html")
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (relative, height) in PAGES.items():
        page = args.html / relative
        if not page.is_file():
            sys.exit(f"{page} does not exist: build the site first (make docs)")
        out = args.out / f"{name}.png"
        screenshot(browser, page, out, args.width, height)
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
