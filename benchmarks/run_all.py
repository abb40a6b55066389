"""Runs every benchmark module ``benchmarks/bench_*.py`` in turn (``make bench``).

Each module writes its raw results to ``benchmarks/results/`` and prints a summary;
BENCHMARKS.md quotes those summaries with the commands that made them.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    for name in names:
        print(f"=== benchmarks.{name}", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"benchmarks.{name}").main([])
        print(f"=== {name} done in {time.perf_counter() - start:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
