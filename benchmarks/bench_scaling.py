"""How each method's cost grows: step time and compiled memory against batch size and width.

Every method registered for ``compare`` is timed on the MLP 784-w-w-10, interleaved with the
plain backprop SGD step on the same model and batch (all methods of one point in one
``benchmarking.time_interleaved`` run, median of repeats after compilation), for a sweep of
batch sizes at a fixed width and a sweep of widths at a fixed batch size. Memory is XLA's
compiled footprint of one step (arguments + outputs + temporaries). The ``curvature`` sweep
times single quantities of ``curvature.value_and_grad`` against ``jax.value_and_grad`` of the
same loss, against batch size.

The growth exponent is the slope of a least-squares line through (log x, log time); log-log
plots show each method next to backprop.

Long sweeps are split into several invocations (each one a few minutes under the shared
benchmark lock): every invocation writes one part file per sweep point under
``<out>/parts/`` and then rebuilds ``scaling.json``, the plots and ``table.md`` from all parts
present, so partial runs merge. A later run of the same (sweep, point, method) replaces the
earlier row.

    python -m benchmarks.bench_scaling --sweep batch --points 32,128            # two points
    python -m benchmarks.bench_scaling --sweep width --points 4096 --methods alig,proxprop
    python -m benchmarks.bench_scaling --sweep curvature --points 32,1024
    python -m benchmarks.bench_scaling --report                 # only merge parts and plot
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from jaxopt_suite import benchmarking, methods, train, zoo

OUT = Path(__file__).parent / "results" / "scaling"
SWEEPS = ("batch", "width", "curvature")
DEFAULT_POINTS = {
    "batch": "32,64,128,256,512,1024",
    "width": "256,512,1024,2048,4096",
    "curvature": "32,64,128,256,512,1024",
}
CURVATURE_DEFAULT = "batch_l2,sum_grad_squared,diag_ggn_mc,diag_ggn_exact"
_BASELINES = ("sgd", "sgd-momentum", "adam")
# Methods whose step does extra work every k steps, and the suffix of the row that times that
# step (the first one); the plain row times a step without it (the other k - 1 of k).
PERIODIC = {"kfac": " (refresh step)"}


def _batch(batch: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(jax.random.randint(jax.random.key(2), (batch, 28, 28), 0, 256), np.uint8)
    labels = np.asarray(jax.random.randint(jax.random.key(3), (batch,), 0, 10), np.int32)
    return images, labels


def _step_inputs(
    method: methods.Method, width: int, batch: int, steps: int = 1000, advance: bool = True
):
    setup = method.build(methods.RunConfig(steps=steps, batch_size=batch, seed=0))
    model = zoo.MLP(hidden=(width, width))
    fields = {k: v for k, v in setup.layers.items() if hasattr(model, k)}
    model = model.clone(**fields) if fields else model
    params = zoo.init_params(model, jax.random.key(0))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    state = train.init_state(params, setup.tx, jax.random.key(1))
    step = jax.jit(train.make_step(problem, setup.tx, setup.gradient))
    batch_arrays = _batch(batch)
    if advance:  # time a typical step (count 1: buffers filled, no periodic refresh due)
        state, _ = step(state, *batch_arrays)
    return step, (state, *batch_arrays)


def _rows(out: dict, names: list[str]) -> dict[str, dict]:
    bp = out["backprop"]
    return {
        name: {
            "method_ms": out[name].median * 1e3,
            "backprop_ms": bp.median * 1e3,
            "ratio": out[name].ratio,
            "method_mb": out[name].memory["total"] / 2**20,
            "backprop_mb": bp.memory["total"] / 2**20,
        }
        for name in names
    }


def measure(
    chosen: list[methods.Method], baseline: methods.Method, width: int, batch: int, repeats: int
) -> dict[str, dict]:
    """One point of a sweep: every method and backprop timed side by side in one run.

    Every step is timed from the state after one step (momentum buffers filled); methods in
    :data:`PERIODIC` also get a row for their refresh step (timed from the initial state).
    """
    fns = {"backprop": _step_inputs(baseline, width, batch)}
    fns.update({m.name: _step_inputs(m, width, batch) for m in chosen})
    for m in chosen:  # methods with a periodic refresh: also the step that refreshes
        if m.name in PERIODIC:
            fns[m.name + PERIODIC[m.name]] = _step_inputs(m, width, batch, advance=False)
    out = benchmarking.time_interleaved(fns, baseline="backprop", repeats=repeats, number=1)
    return _rows(out, [name for name in fns if name != "backprop"])


def measure_curvature(quantities: list[str], width: int, batch: int, repeats: int) -> dict:
    """Curvature quantities (one per function) next to the plain gradient, side by side."""
    from jaxopt_suite import curvature

    model = zoo.MLP(hidden=(width, width))
    params = zoo.init_params(model, jax.random.key(0))
    apply = lambda p, x: model.apply({"params": p}, x)
    images, labels = _batch(batch)
    x = train.data_lib.normalize(images).reshape(batch, -1)
    key = jax.random.key(4)
    loss = lambda p, x, y: train.cross_entropy(apply(p, x), y)
    fns = {"backprop": (jax.jit(jax.value_and_grad(loss)), (params, x, labels))}
    for q in quantities:
        fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(q,))
        fns[q] = (jax.jit(lambda p, x, y, k, fn=fn: fn(p, x, y, key=k)), (params, x, labels, key))
    out = benchmarking.time_interleaved(fns, baseline="backprop", repeats=repeats, number=1)
    return _rows(out, quantities)


def exponent(xs, ys) -> float:
    """Slope of the least-squares line through (log x, log y): cost ~ x^slope."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ---------------------------------------------------------------------------------------------
# parts: one JSON per (sweep, point), merged into the report


def _part_path(out: Path, sweep: str, point: int) -> Path:
    return out / "parts" / f"{sweep}-{point}.json"


def save_part(out: Path, sweep: str, point: int, rows: dict, meta: dict) -> Path:
    """Adds ``rows`` (method -> row) to the part file of ``(sweep, point)``; same names replace."""
    path = _part_path(out, sweep, point)
    old = json.loads(path.read_text())["rows"] if path.exists() else {}
    stamped = {name: {**row, **meta} for name, row in rows.items()}
    return benchmarking.write_json(
        path, {"sweep": sweep, "point": point, "rows": {**old, **stamped}}
    )


def load_parts(out: Path) -> dict[str, dict[str, list[dict]]]:
    """sweep -> method -> rows sorted by the swept variable, from every part file present."""
    merged: dict[str, dict[str, list[dict]]] = {s: {} for s in SWEEPS}
    for path in sorted((out / "parts").glob("*.json")):
        part = json.loads(path.read_text())
        axis = "width" if part["sweep"] == "width" else "batch"
        for name, row in part["rows"].items():
            merged[part["sweep"]].setdefault(name, []).append({axis: part["point"], **row})
    for by_name in merged.values():
        for rows in by_name.values():
            rows.sort(key=lambda r: r.get("width", r.get("batch")))
    return merged


def _backprop_line(rows_by_name: dict[str, list[dict]], axis: str) -> tuple[list, list, list]:
    """Backprop's time and memory per point: median over the runs that measured the point."""
    times: dict[int, list[float]] = {}
    mbs: dict[int, float] = {}
    for rows in rows_by_name.values():
        for r in rows:
            times.setdefault(r[axis], []).append(r["backprop_ms"])
            mbs[r[axis]] = r["backprop_mb"]
    xs = sorted(times)
    return xs, [float(np.median(times[x])) for x in xs], [mbs[x] for x in xs]


def plot(results: dict[str, list[dict]], axis: str, path: Path, baseline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rows) in enumerate(results.items()):
        xs = [r[axis] for r in rows]
        ts = [r["method_ms"] for r in rows]
        style = ("o-", "s--", "^:")[i // 10]  # the colour cycle has 10 entries
        line = ax_t.loglog(xs, ts, style, label=f"{name} (x^{exponent(xs, ts):.2f})")
        ax_m.loglog(
            xs, [r["method_mb"] for r in rows], style, color=line[0].get_color(), label=name
        )
    xs, bp, bp_mb = _backprop_line(results, axis)
    ax_t.loglog(xs, bp, "k--", lw=2, label=f"{baseline} (x^{exponent(xs, bp):.2f})")
    ax_m.loglog(xs, bp_mb, "k--", lw=2, label=baseline)
    ax_t.set(xlabel=axis, ylabel="ms per step (median)", title=f"time vs {axis}")
    ax_m.set(xlabel=axis, ylabel="compiled MB", title=f"compiled memory vs {axis}")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(merged: dict) -> str:
    by_batch, by_width, curv = merged["batch"], merged["width"], merged["curvature"]
    lines = []
    names = list(dict.fromkeys([*by_batch, *by_width]))
    if names:
        lines += [
            "| method | time ~ N^a (w=512) | time ~ w^b (N=128) | ratio at largest N "
            "| ratio at largest w | MB at largest w (backprop) |",
            "|---|---|---|---|---|---|",
        ]
        for name in names:
            rb, rw = by_batch.get(name, []), by_width.get(name, [])
            cells = [name]
            for rows, axis in ((rb, "batch"), (rw, "width")):
                xs = [r[axis] for r in rows]
                cells.append(f"{exponent(xs, [r['method_ms'] for r in rows]):.2f}")
            for rows, axis in ((rb, "batch"), (rw, "width")):
                last = rows[-1] if rows else None
                cells.append(f"{last['ratio']:.2f} ({axis[0]}={last[axis]})" if last else "-")
            cells.append(f"{rw[-1]['method_mb']:.0f} ({rw[-1]['backprop_mb']:.0f})" if rw else "-")
            lines.append("| " + " | ".join(cells) + " |")
        xb, bpb, _ = _backprop_line(by_batch, "batch")
        xw, bpw, _ = _backprop_line(by_width, "width")
        lines.append(
            f"| backprop sgd | {exponent(xb, bpb):.2f} | {exponent(xw, bpw):.2f} "
            "| 1.00 | 1.00 | - |"
        )
    if curv:
        lines += [
            "",
            "| curvature quantity (MLP w=512) | time ~ N^a | ratio to gradient at each N |",
            "|---|---|---|",
        ]
        for name, rows in curv.items():
            xs = [r["batch"] for r in rows]
            ratios = ", ".join(f"{r['batch']}: {r['ratio']:.2f}" for r in rows)
            lines.append(
                f"| {name} | {exponent(xs, [r['method_ms'] for r in rows]):.2f} | {ratios} |"
            )
        xc, bpc, _ = _backprop_line(curv, "batch")
        lines.append(f"| jax.value_and_grad | {exponent(xc, bpc):.2f} | 1.00 |")
    return "\n".join(lines)


def report(out: Path) -> str:
    """Merges every part under ``out/parts`` into scaling.json, the plots and table.md."""
    merged = load_parts(out)
    files = {
        "batch": ("time_vs_batch.png", "batch", "backprop sgd"),
        "width": ("time_vs_width.png", "width", "backprop sgd"),
        "curvature": ("curvature_vs_batch.png", "batch", "jax.value_and_grad"),
    }
    for sweep, (name, axis, baseline) in files.items():
        if merged[sweep]:
            plot(merged[sweep], axis, out / name, baseline)
    table = _table(merged)
    benchmarking.write_json(
        out / "scaling.json",
        {
            "by_batch": merged["batch"],
            "by_width": merged["width"],
            "curvature_by_batch": merged["curvature"],
        },
    )
    (out / "table.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=SWEEPS, default=None, help="which sweep to measure")
    parser.add_argument("--points", default=None, help="comma list of batch sizes or widths")
    parser.add_argument("--methods", default=None, help="comma list (default: all but baselines)")
    parser.add_argument("--quantities", default=CURVATURE_DEFAULT, help="curvature sweep only")
    parser.add_argument("--fixed-width", type=int, default=512)
    parser.add_argument("--fixed-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--report", action="store_true", help="only merge the parts and plot")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = parser.parse_args(argv)
    out = args.out
    if not args.report:
        if args.sweep is None:
            parser.error("--sweep is required unless --report")
        points = [int(p) for p in (args.points or DEFAULT_POINTS[args.sweep]).split(",")]
        meta = {
            "repeats": args.repeats,
            "loadavg_1m_before": os.getloadavg()[0],
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if args.sweep == "curvature":
            quantities = args.quantities.split(",")
        else:
            registry = methods.registry()
            names = (
                args.methods.split(",")
                if args.methods
                else [n for n in registry if n not in _BASELINES]
            )
            chosen = methods.get(names)
        for p in points:
            start = time.perf_counter()
            meta["loadavg_1m_before"] = os.getloadavg()[0]
            if args.sweep == "curvature":
                rows = measure_curvature(quantities, args.fixed_width, p, args.repeats)
                meta["fixed_width"] = args.fixed_width
            elif args.sweep == "batch":
                rows = measure(chosen, registry["sgd"], args.fixed_width, p, args.repeats)
                meta["fixed_width"] = args.fixed_width
            else:
                rows = measure(chosen, registry["sgd"], p, args.fixed_batch, args.repeats)
                meta["fixed_batch"] = args.fixed_batch
            meta["loadavg_1m_after"] = os.getloadavg()[0]
            save_part(out, args.sweep, p, rows, meta)
            summary = ", ".join(f"{n} {r['ratio']:.2f}" for n, r in rows.items())
            print(
                f"{args.sweep} {p}: {time.perf_counter() - start:.0f} s, "
                f"load {meta['loadavg_1m_before']:.2f}->{meta['loadavg_1m_after']:.2f}; "
                f"backprop {next(iter(rows.values()))['backprop_ms']:.2f} ms; {summary}",
                flush=True,
            )
    print(report(out))


if __name__ == "__main__":
    main()
