"""How each method's cost grows: step time and compiled memory against batch size and width.

Every method registered for ``compare`` is timed on the MLP 784-w-w-10, interleaved with the
plain backprop SGD step on the same model and batch (all methods of one point in one
``benchmarking.time_interleaved`` run, median of repeats after compilation), for a sweep of
batch sizes at a fixed width and a sweep of widths at a fixed batch size. Memory is XLA's
compiled footprint of one step (arguments + outputs + temporaries). The
growth exponent is the slope of a least-squares line through (log x, log time); log-log plots
show the method next to backprop.

    python -m benchmarks.bench_scaling                       # all methods, default sweeps
    python -m benchmarks.bench_scaling --methods alig,proxprop --widths 256,1024 --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from jaxopt_suite import benchmarking, methods, train, zoo

OUT = Path(__file__).parent / "results" / "scaling"


def _step_inputs(method: methods.Method, width: int, batch: int, steps: int = 1000):
    setup = method.build(methods.RunConfig(steps=steps, batch_size=batch, seed=0))
    model = zoo.MLP(hidden=(width, width))
    fields = {k: v for k, v in setup.layers.items() if hasattr(model, k)}
    model = model.clone(**fields) if fields else model
    params = zoo.init_params(model, jax.random.key(0))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    state = train.init_state(params, setup.tx, jax.random.key(1))
    images = np.asarray(jax.random.randint(jax.random.key(2), (batch, 28, 28), 0, 256), np.uint8)
    labels = np.asarray(jax.random.randint(jax.random.key(3), (batch,), 0, 10), np.int32)
    step = jax.jit(train.make_step(problem, setup.tx, setup.gradient))
    return step, (state, images, labels)


def measure(
    chosen: list[methods.Method], baseline: methods.Method, width: int, batch: int, repeats: int
) -> dict[str, dict]:
    """One point of a sweep: every method and backprop timed side by side in one run."""
    fns = {"backprop": _step_inputs(baseline, width, batch)}
    fns.update({m.name: _step_inputs(m, width, batch) for m in chosen})
    out = benchmarking.time_interleaved(fns, baseline="backprop", repeats=repeats, number=1)
    bp = out["backprop"]
    return {
        m.name: {
            "method_ms": out[m.name].median * 1e3,
            "backprop_ms": bp.median * 1e3,
            "ratio": out[m.name].ratio,
            "method_mb": out[m.name].memory["total"] / 2**20,
            "backprop_mb": bp.memory["total"] / 2**20,
        }
        for m in chosen
    }


def exponent(xs, ys) -> float:
    """Slope of the least-squares line through (log x, log y): cost ~ x^slope."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(results: dict, axis: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        xs = [r[axis] for r in rows]
        line = ax_t.loglog(
            xs,
            [r["method_ms"] for r in rows],
            "o-",
            label=f"{name} (x^{exponent(xs, [r['method_ms'] for r in rows]):.2f})",
        )
        ax_m.loglog(xs, [r["method_mb"] for r in rows], "o-", color=line[0].get_color(), label=name)
    first = next(iter(results.values()))
    xs = [r[axis] for r in first]
    bp = [r["backprop_ms"] for r in first]
    ax_t.loglog(xs, bp, "k--", label=f"backprop sgd (x^{exponent(xs, bp):.2f})")
    ax_m.loglog(xs, [r["backprop_mb"] for r in first], "k--", label="backprop sgd")
    ax_t.set(xlabel=axis, ylabel="step ms (median)", title=f"step time vs {axis}")
    ax_m.set(xlabel=axis, ylabel="compiled MB", title=f"compiled memory vs {axis}")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma list (default: all but baselines)")
    parser.add_argument("--batch-sizes", default="32,64,128,256,512,1024")
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--fixed-width", type=int, default=1024)
    parser.add_argument("--fixed-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two points per sweep, 2 repeats")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = parser.parse_args(argv)
    registry = methods.registry()
    baseline = registry["sgd"]
    names = (
        args.methods.split(",")
        if args.methods
        else [n for n in registry if n not in ("sgd", "sgd-momentum", "adam")]
    )
    chosen = methods.get(names)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    if args.quick:
        batches, widths, args.repeats = batches[:2], widths[:2], 2
    by_batch = {m.name: [] for m in chosen}
    by_width = {m.name: [] for m in chosen}
    for n in batches:
        for name, row in measure(chosen, baseline, args.fixed_width, n, args.repeats).items():
            by_batch[name].append({"batch": n, **row})
        print(f"batch {n}: done", flush=True)
    for w in widths:
        for name, row in measure(chosen, baseline, w, args.fixed_batch, args.repeats).items():
            by_width[name].append({"width": w, **row})
        print(f"width {w}: done", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    plot(by_batch, "batch", out / "time_vs_batch.png")
    plot(by_width, "width", out / "time_vs_width.png")
    lines = [
        "| method | time ~ N^a | time ~ w^b | ratio at N="
        + f"{batches[-1]} | ratio at w={widths[-1]}"
        " | MB at w=" + f"{widths[-1]} (backprop) |",
        "|---|---|---|---|---|---|",
    ]
    for name in by_batch:
        rb, rw = by_batch[name], by_width[name]
        lines.append(
            f"| {name} | {exponent(batches, [r['method_ms'] for r in rb]):.2f} | "
            f"{exponent(widths, [r['method_ms'] for r in rw]):.2f} | {rb[-1]['ratio']:.2f} | "
            f"{rw[-1]['ratio']:.2f} | {rw[-1]['method_mb']:.0f} ({rw[-1]['backprop_mb']:.0f}) |"
        )
    first_b, first_w = next(iter(by_batch.values())), next(iter(by_width.values()))
    bp_b = [r["backprop_ms"] for r in first_b]
    bp_w = [r["backprop_ms"] for r in first_w]
    lines.append(
        f"| backprop sgd | {exponent(batches, bp_b):.2f} | {exponent(widths, bp_w):.2f} "
        "| 1.00 | 1.00 | - |"
    )
    benchmarking.write_json(
        out / "scaling.json",
        {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "by_batch": by_batch,
            "by_width": by_width,
        },
    )
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
