"""``jaxopt-suite compare``: train one model with several methods, side by side with backprop.

For each method it trains the same model from the same initial parameters on the same batches,
then prints a table (final training loss, test accuracy, median step time, step time relative
to backprop SGD, compiled step memory) and writes ``results.json``, ``compare.md`` and PNG plots
to the output directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_suite.harness import benchmarking, recipes, train, zoo
from jaxopt_suite.harness import data as data_lib

DEFAULTS = {
    "dataset": "mnist",
    "model": "mlp",
    "steps": 300,
    "batch_size": 128,
    "seed": 0,
    "output": "runs/compare",
}
# One method of each family plus the backprop baselines: the default run stays within a few
# minutes on 2 CPU cores. ``--methods all`` runs every registered method.
DEFAULT_METHODS = (
    "sgd",
    "sgd-momentum",
    "adam",
    "alig",
    "sgd+l21-prune",
    "diag-ggn-mc",
    "fwdgrad-activity",
    "proxprop-warmup",
)


def _progress_bar(total: int, label: str):
    """A tqdm bar on a terminal when tqdm is installed (the ``examples`` extra); otherwise (a
    log file, a pipe) a plain line at every quarter of the run, so logs stay readable."""
    tqdm = None
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=f"{label:>14}", leave=True, dynamic_ncols=True)

        def update(i: int, value) -> None:
            bar.update(1)
            if i % 25 == 0 or i == total:
                bar.set_postfix(loss=f"{float(value):.4f}")
            if i == total:
                bar.close()

        return update

    def update_plain(i: int, value) -> None:
        if i == total or i % max(1, total // 4) == 0:
            print(f"{label:>14}: step {i}/{total} loss {float(value):.4f}", flush=True)

    return update_plain


def run_method(
    method: recipes.Method,
    dataset: data_lib.Dataset,
    model_name: str,
    config: recipes.RunConfig,
    *,
    quiet: bool = False,
    num_evals: int = 5,
) -> dict[str, Any]:
    """Trains ``model_name`` with one method and returns its row of results plus its history
    (the test set evaluated ``num_evals`` times, evenly spaced, the last after the last step)."""
    setup = method.build(config)
    model = zoo.make_model(model_name, **setup.layers)
    init_key, data_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
    params = zoo.init_params(model, init_key)
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    step = train.jit_step(train.make_step(problem, setup.tx, setup.gradient))
    state = train.init_state(params, setup.tx, step_key)
    images, labels = (
        dataset.train_images[: config.batch_size],
        dataset.train_labels[: config.batch_size],
    )
    memory = benchmarking.compiled_memory(step.lower(state, images, labels).compile())
    evaluate = train.make_evaluate(problem)
    progress = None if quiet else _progress_bar(config.steps, method.name)
    state, history = train.fit(
        step,
        state,
        dataset,
        steps=config.steps,
        batch_size=config.batch_size,
        key=data_key,
        evaluate=evaluate,
        num_evals=num_evals,
        progress=progress,
    )
    tail = max(1, config.steps // 10)
    row = {
        "method": method.name,
        "description": method.description,
        "final_train_loss": float(np.mean(history.loss[-tail:])),
        "test_accuracy": float(history.test_accuracy[-1]),
        "median_step_ms": float(np.median(history.step_time) * 1e3),
        "compiled_memory_mb": memory["total"] / 2**20,
        "skipped_steps": history.skipped,
    }
    if setup.report is not None:
        row.update(setup.report(state.params))
    return {"row": row, "history": history._asdict()}


COLUMNS = [
    ("method", "method", "{}"),
    ("final_train_loss", "train loss", "{:.4f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("median_step_ms", "step ms", "{:.2f}"),
    ("relative_step_time", "vs sgd", "{:.2f}x"),
    ("compiled_memory_mb", "memory MB", "{:.1f}"),
]


def format_table(
    rows: list[dict[str, Any]],
    markdown: bool = False,
    columns: Sequence[tuple[str, str, str]] | None = None,
) -> str:
    """Formats result rows as a fixed-width (or markdown) table.

    ``columns`` lists ``(key, title, format)``; by default :data:`COLUMNS` followed by any
    other keys of the rows (``reproduce`` passes its claim columns).
    """
    if columns is None:
        extra = sorted(
            {k for r in rows for k in r}
            - {c for c, _, _ in COLUMNS}
            - {"description", "skipped_steps"}
        )
        columns = [*COLUMNS, *[(k, k, "{}") for k in extra]]
    cols = list(columns)

    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    table = [[title for _, title, _ in cols]]
    table += [[cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    # numbers right-aligned, text (the first column, and "{}" columns of strings) left-aligned
    text = [
        i == 0 or all(not isinstance(r.get(k), int | float) for r in rows)
        for i, (k, _, f) in enumerate(cols)
    ]
    fmt_row = lambda r: "  ".join(
        c.ljust(w) if t else c.rjust(w) for c, w, t in zip(r, widths, text, strict=True)
    )
    return "\n".join(
        [fmt_row(table[0]), "  ".join("-" * w for w in widths), *map(fmt_row, table[1:])]
    )


def plot(results: list[dict[str, Any]], output: Path, title: str = "") -> list[Path]:
    """Writes loss-vs-steps, loss-vs-time and test-accuracy PNGs, each titled ``title``;
    needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(y: np.ndarray) -> np.ndarray:
        w = max(1, len(y) // 30)
        return np.convolve(y, np.ones(w) / w, mode="valid") if w > 1 else y

    # Ten colours, then the same colours dashed, then dotted: every method stays distinguishable.
    colours = plt.get_cmap("tab10").colors
    dashes = ("-", "--", ":", "-.")
    styles = {
        r["row"]["method"]: {"color": colours[i % 10], "linestyle": dashes[(i // 10) % 4]}
        for i, r in enumerate(results)
    }
    paths = []
    for name, xkey, xlabel in [
        ("loss_vs_steps.png", None, "step"),
        ("loss_vs_time.png", "wall", "wall-clock seconds (compilation excluded)"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            y = smooth(np.asarray(r["history"]["loss"]))
            x = (
                np.arange(1, len(y) + 1)
                if xkey is None
                else np.asarray(r["history"][xkey])[len(r["history"][xkey]) - len(y) :]
            )
            ax.plot(x, y, label=r["row"]["method"], **styles[r["row"]["method"]])
        ax.set(xlabel=xlabel, ylabel="training loss (moving average)", yscale="log", title=title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(output / name, dpi=120)
        plt.close(fig)
        paths.append(output / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        method = r["row"]["method"]
        ax.plot(
            r["history"]["eval_step"],
            r["history"]["test_accuracy"],
            marker="o",
            label=method,
            **styles[method],
        )
    ax.set(xlabel="step", ylabel="test accuracy", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "test_accuracy.png", dpi=120)
    plt.close(fig)
    paths.append(output / "test_accuracy.png")
    return paths


def write_plots(make: Callable[[], list[Path]], md: list[str]) -> bool:
    """Calls ``make`` and links its PNGs in the markdown lines ``md``; without matplotlib it
    says so and returns False (then no plots were written)."""
    try:
        paths = make()
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no plots written")
        return False
    md.extend(f"![{p.stem}]({p.name})" for p in paths)
    return True


def compare(
    dataset: str = DEFAULTS["dataset"],
    model: str = DEFAULTS["model"],
    method_names: Sequence[str] | None = None,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    output: str | Path = DEFAULTS["output"],
    plots: bool = True,
    quiet: bool = False,
    data_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Runs the comparison and writes its outputs; returns the result rows.

    ``data_dir``: a directory of the four IDX files of an MNIST-like dataset
    (:func:`jaxopt_suite.harness.data.load_idx`), used instead of ``dataset``, which then only
    names it in the outputs. ``method_names``: ``None`` for the default set, ``["all"]`` for
    every registered method; an empty list or an empty name is an error.
    """
    if method_names is not None and (not method_names or "" in method_names):
        raise ValueError(
            f"--methods must name at least one method (comma-separated, no empty names) or "
            f"'all'; got {','.join(method_names)!r}"
        )
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is an existing file; give a directory")
    if model not in zoo.MODELS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(zoo.MODELS)}")
    if data_dir is None and dataset not in data_lib.DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; valid names: {', '.join(data_lib.DATASETS)}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    if method_names is None:
        method_names = DEFAULT_METHODS
    elif list(method_names) == ["all"]:
        method_names = list(recipes.registry())
    chosen = recipes.get(list(method_names))
    data = data_lib.load(dataset) if data_dir is None else data_lib.load_idx(data_dir)
    config = recipes.RunConfig(steps=steps, batch_size=batch_size, seed=seed)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [run_method(m, data, model, config, quiet=quiet) for m in chosen]
    rows = [r["row"] for r in results]
    base = next((r["median_step_ms"] for r in rows if r["method"] == "sgd"), None)
    for r in rows:
        r["relative_step_time"] = None if base is None else r["median_step_ms"] / base
    table = format_table(rows)
    print(f"\n{dataset} / {model}: {steps} steps of batch {batch_size}, seed {seed}\n")
    print(table)
    settings = {
        "dataset": dataset,
        "model": model,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    benchmarking.write_json(output / "results.json", {"settings": settings, "results": results})
    command = " ".join(
        [
            "jaxopt-suite compare",
            f"--dataset {dataset}",
            f"--model {model}",
            f"--methods {','.join(m.name for m in chosen)}",
            f"--steps {steps}",
            f"--batch-size {batch_size}",
            f"--seed {seed}",
        ]
    )
    md = [
        f"# compare: {dataset} / {model}",
        "",
        f"Command: `{command}`",
        "",
        format_table(rows, markdown=True),
        "",
        "Settings of each row:",
        "",
        *[f"- `{r['method']}`: {r['description']}" for r in rows],
        "",
        "Step times are medians over all steps after compilation; `vs sgd` divides by the "
        "`sgd` run's median. Memory is XLA's compiled footprint of one step "
        "(arguments + outputs + temporaries - donated).",
        "",
    ]
    title = f"{dataset} / {model}, {steps} steps of batch {batch_size}"
    written = plots and write_plots(lambda: plot(results, output, title), md)
    (output / "compare.md").write_text("\n".join(md) + "\n")
    print(
        f"\nwrote {output / 'results.json'}, {output / 'compare.md'}"
        f"{' and plots' if written else ''} ({time.perf_counter() - started:.0f} s)"
    )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxopt-suite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="train one model with several methods, side by side")
    p.add_argument(
        "--dataset",
        default=DEFAULTS["dataset"],
        help=f"one of {', '.join(data_lib.DATASETS)} (default %(default)s)",
    )
    p.add_argument(
        "--model",
        default=DEFAULTS["model"],
        help=f"one of {', '.join(zoo.MODELS)} (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names, or 'all' (default: one per family); see `list`",
    )
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument(
        "--epochs", type=float, default=None, help="train for this many epochs instead of --steps"
    )
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--output", default=DEFAULTS["output"], help="directory for results and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--data-dir",
        default=None,
        help="read the four IDX files of any MNIST-like dataset from DIR instead of --dataset",
    )
    sub.add_parser("list", help="list methods, models and datasets")
    r = sub.add_parser(
        "reproduce", help="one seed's headline result, its claim beside ours (see --list)"
    )
    r.add_argument("name", nargs="?", help="the target; --list shows them")
    r.add_argument("--list", action="store_true", help="list the targets and their run times")
    r.add_argument("--quick", action="store_true", help="a tiny run (smoke test, not a result)")
    r.add_argument("--output", default=None, help="directory (default runs/reproduce/NAME)")
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    from jaxopt_suite.harness import reproduce

    if args.list or args.name is None:
        print("targets (expected run time on 2 CPU cores):")
        print(reproduce.listing())
        return 0
    reproduce.reproduce(args.name, quick=args.quick, output=args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print("methods:")
        for m in recipes.registry().values():
            print(f"  {m.name:<16} {m.description}")
        print("models:")
        for name, (_, desc) in zoo.MODELS.items():
            print(f"  {name:<16} {desc}")
        print(f"datasets: {', '.join(data_lib.DATASETS)}")
        return 0
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        steps = args.steps
        if args.epochs is not None:
            loaded = (
                data_lib.load(args.dataset)
                if args.data_dir is None
                else data_lib.load_idx(args.data_dir)
            )
            n_train = len(loaded.train_labels)
            steps = max(1, int(args.epochs * n_train) // args.batch_size)
        compare(
            dataset=args.dataset,
            model=args.model,
            method_names=None if args.methods is None else args.methods.split(","),
            steps=steps,
            batch_size=args.batch_size,
            seed=args.seed,
            output=args.output,
            plots=not args.no_plots,
            data_dir=args.data_dir,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxopt-suite: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
