"""Same-run A/B of two commits: the refactor's no-regression check.

Each commit gets a worker process (``ab_worker.py``) that imports jaxopt_suite from a
checkout of that commit, compiles every workload once, then times one workload at a time
when asked; the driver alternates the two workers (which one goes first rotates each round),
so both see the same machine load. Reports the median of the per-round ratios new / old.

    python -m benchmarks.experiments.ab_commits --old 3e27910 --new HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ab_worker.py")


def _checkout(rev: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev],
        check=True,
        capture_output=True,
    )
    return folder


class _Worker:
    def __init__(self, tree: Path):
        env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the baseline commit")
    parser.add_argument("--new", default="HEAD", help="the commit under test")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workloads", nargs="*", default=None)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/architecture_ab")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(WORKER.parent))
    from ab_worker import WORKLOADS

    names = args.workloads or list(WORKLOADS)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            sides[label] = _checkout(rev, Path(tmp) / label)
        revs = {
            label: subprocess.run(
                ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for label, tree in sides.items()
        }
        workers = {label: _Worker(tree) for label, tree in sides.items()}
        try:
            load_before = _load()
            memory = {label: {} for label in workers}
            program = {label: {} for label in workers}
            for name in names:
                for label, w in workers.items():
                    reply = w.ask(cmd="setup", workload=name)
                    memory[label][name] = reply["temp_mb"]
                    program[label][name] = reply["program"]
            samples = {name: {"old": [], "new": []} for name in names}
            order = ["old", "new"]
            for r in range(args.warmup + args.repeats):
                for name in names:
                    for label in order if r % 2 == 0 else order[::-1]:
                        s = workers[label].ask(cmd="time", workload=name, number=args.number)
                        if r >= args.warmup:
                            samples[name][label].append(s["seconds"])
            load_after = _load()
        finally:
            for w in workers.values():
                w.close()
            for tree in sides.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
    rows = []
    for name in names:
        old, new = (np.asarray(samples[name][k]) for k in ("old", "new"))
        ratios = new / old
        rows.append(
            {
                "workload": name,
                "old_ms": float(np.median(old) * 1e3),
                "new_ms": float(np.median(new) * 1e3),
                "ratio_median": float(np.median(ratios)),
                "ratio_p25": float(np.percentile(ratios, 25)),
                "ratio_p75": float(np.percentile(ratios, 75)),
                "old_temp_mb": memory["old"][name],
                "new_temp_mb": memory["new"][name],
                "same_program": program["old"][name] == program["new"][name],
            }
        )
    result = {
        "old": revs["old"],
        "new": revs["new"],
        "repeats": args.repeats,
        "number": args.number,
        "load_before": load_before,
        "load_after": load_after,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Same-run A/B: {revs['old']} (old) against {revs['new']} (new)",
        "",
        f"`python -m benchmarks.experiments.ab_commits --old {args.old} --new {args.new}"
        f" --repeats {args.repeats} --number {args.number}`; load {load_before} before, "
        f"{load_after} after. Ratio = new / old per round (rounds alternate which goes first), "
        "median and p25-p75; temp = XLA's compiled temporary memory; same program: the lowered "
        "StableHLO of both sides is identical (source locations aside).",
        "",
        "| workload | old ms | new ms | new/old | p25-p75 | temp MB old / new | same program |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | "
            f"{r['ratio_median']:.3f} | {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | "
            f"{r['old_temp_mb']:.1f} / {r['new_temp_mb']:.1f} | "
            f"{'yes' if r['same_program'] else 'no'} |"
        )
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
