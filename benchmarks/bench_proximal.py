"""Proximal auto-sizing on MNIST: step overhead, a sweep of reg, and the shrunk model's speed.

1. Overhead: one training step of the MLP 784-1024-1024-10 (batch 128) with
   ``optax.chain(optax.sgd(0.1), group_sparsity(...))`` against plain SGD, timed side by side
   (interleaved, median of repeats, after compilation). Goals: l21 <= 1.10, linf1 <= 1.25.
2. Sweep: the same MLP trained with SGD + group sparsity for several values of reg; live units
   per hidden layer against test accuracy (plot).
3. Shrink: the dead units of a trained model are deleted (``autosize.shrink``) and the
   inference time of the shrunk model is measured against the original, side by side.
4. ``--newton-stats N``: how much work the exact linf1 threshold needs, per hidden layer, at the
   overhead benchmark's state and during training (at each step in ``N``): how many groups
   have more than one entry within ``t`` of their largest (those a "max minus t" shortcut
   cannot settle), and how many Newton steps each group's threshold takes. Untimed.

Run: ``.venv/bin/python -m benchmarks.bench_proximal`` (``--quick`` for a fast sanity run);
the timed sections take ``/tmp/jaxopt_bench.lock`` themselves, the training does not.
Writes ``benchmarks/results/proximal/*.json``, ``sweep.png`` and
``benchmarks/results/proximal.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxopt_suite import autosize, benchmarking, group_sparsity, train, zoo
from jaxopt_suite import data as data_lib

RESULTS = Path(__file__).parent / "results"
GOALS = {"l21": 1.10, "linf1": 1.25}
CHAIN = ["Dense_0", "Dense_1", "Dense_2"]
SGD_LR = 0.1
PROX_LR = 0.1  # ProxGradPytorch's default, independent of the optimizer's


@contextlib.contextmanager
def timing_lock(path: str = "/tmp/jaxopt_bench.lock"):
    """Holds the lock that timing runs on this shared machine take (like ``flock``), so the
    long, untimed training of the sweep does not block anyone."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_tx(norm: str | None, reg: float) -> optax.GradientTransformation:
    if norm is None:
        return optax.sgd(SGD_LR)
    # The output layer's units are the classes: they are not auto-sized.
    mask = {"Dense_0": True, "Dense_1": True, "Dense_2": False}
    return optax.chain(optax.sgd(SGD_LR), group_sparsity(reg, PROX_LR, norm=norm, mask=mask))


def trained_params(model, problem, steps: int, batch_size: int):
    """The MLP's parameters after ``steps`` steps of SGD + linf1 (reg 1e-3, the overhead
    benchmark's strength) on MNIST: in training the linf1 prox leaves several entries of a
    group tied at its threshold, so the exact threshold needs more Newton steps than at
    initialisation (``--newton-stats``)."""
    params = zoo.init_params(model, jax.random.key(0))
    if steps == 0:
        return params
    dataset = data_lib.load("mnist")
    tx = make_tx("linf1", 1e-3)
    step = train.jit_step(train.make_step(problem, tx))
    state = train.init_state(params, tx, jax.random.key(1))
    batches = train.epochs(
        jax.random.key(2), dataset.train_images, dataset.train_labels, batch_size
    )
    for _ in range(steps):
        state, _ = step(state, *next(batches))
    return state.params


def overhead(args: argparse.Namespace) -> dict:
    model = zoo.make_model("mlp")
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = trained_params(model, problem, args.overhead_after, args.batch_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
    fns = {}
    for name, norm in [("sgd", None), ("sgd+l21", "l21"), ("sgd+linf1", "linf1")]:
        tx = make_tx(norm, 1e-3)
        step = jax.jit(train.make_step(problem, tx))
        fns[name] = (step, (train.init_state(params, tx, jax.random.key(1)), images, labels))
    with timing_lock():
        timings = benchmarking.time_interleaved(
            fns, baseline="sgd", repeats=args.repeats, number=args.number
        )
    return {
        name: {
            "median_ms": t.median * 1e3,
            "ratio": t.ratio,
            "memory": t.memory,
            "samples_ms": (t.samples * 1e3).tolist(),
        }
        for name, t in timings.items()
    }


def newton_work(params, updates, t: float) -> dict:
    """Per regularised layer: the groups (output units with their bias) whose l1-ball threshold
    is not simply ``max|z| - t`` (more than one entry of ``z = p + u`` above it), the number of
    entries above it (median, max), and a histogram of the Newton (Michelot) steps that move
    the threshold, counted by an independent loop in float32."""
    out = {}
    for name in ("Dense_0", "Dense_1"):
        z = np.concatenate(
            [
                np.asarray(params[name]["kernel"] + updates[name]["kernel"]),
                np.asarray(params[name]["bias"] + updates[name]["bias"])[None],
            ]
        )
        a = np.abs(z).astype(np.float32)
        theta = np.maximum(a.max(axis=0) - np.float32(t), 0)
        above = (a > theta).sum(axis=0)
        moves = np.zeros(a.shape[1], np.int64)
        for _ in range(a.shape[0]):
            excess = np.maximum(a - theta, 0).sum(axis=0, dtype=np.float32) - np.float32(t)
            count = (a > theta).sum(axis=0).astype(np.float32)
            step = np.where(count > 0, excess / np.maximum(count, 1), 0).astype(np.float32)
            new = np.maximum(theta + step, theta)
            moved = new > theta
            if not moved.any():
                break
            moves += moved
            theta = new
        out[name] = {
            "groups": int(a.shape[1]),
            "more_than_one_above_max_minus_t": int((above > 1).sum()),
            "entries_above_max_minus_t_median": float(np.median(above)),
            "entries_above_max_minus_t_max": int(above.max()),
            "newton_moves_histogram": np.bincount(moves).tolist(),
        }
    return out


def newton_stats(args: argparse.Namespace, dataset: data_lib.Dataset) -> dict:
    """:func:`newton_work` at the overhead benchmark's state (its random batch) and at each
    step ``i`` in ``args.newton_stats`` of linf1 training with the benchmark's strength (reg
    1e-3): the parameters after ``i - 1`` steps, the update of step ``i``'s batch."""
    model = zoo.make_model("mlp")
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    grad = jax.jit(jax.grad(problem.loss_fn))
    reg = 1e-3
    t = reg * PROX_LR

    def work(params, images, labels):
        g = grad(params, data_lib.normalize(images), labels)
        return newton_work(params, jax.tree.map(lambda x: -SGD_LR * x, g), t)

    params = zoo.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
    result = {"strength": t, "overhead_state": work(params, images, labels), "training": {}}
    tx = make_tx("linf1", reg)
    step = train.jit_step(train.make_step(problem, tx))
    state = train.init_state(params, tx, jax.random.key(1))
    batches = train.epochs(
        jax.random.key(2), dataset.train_images, dataset.train_labels, args.batch_size
    )
    for i in range(1, max(args.newton_stats, default=0) + 1):
        images, labels = next(batches)
        if i in args.newton_stats:
            result["training"][i] = work(state.params, images, labels)
        state, _ = step(state, images, labels)
    return result


def sweep(args: argparse.Namespace, dataset: data_lib.Dataset) -> tuple[list[dict], dict]:
    model = zoo.make_model("mlp")
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    evaluate = train.make_evaluate(problem)
    init = zoo.init_params(model, jax.random.key(args.seed))
    rows, trained = [], {}
    runs = [(None, 0.0)] + [("l21", r) for r in args.l21] + [("linf1", r) for r in args.linf1]
    for norm, reg in runs:
        tx = make_tx(norm, reg)
        step = train.jit_step(train.make_step(problem, tx))
        # The jitted step donates its state: every run starts from its own copy.
        params = jax.tree.map(np.array, init)
        state = train.init_state(params, tx, jax.random.key(args.seed + 1))
        start = time.perf_counter()
        state, history = train.fit(
            step,
            state,
            dataset,
            steps=args.steps,
            batch_size=args.batch_size,
            key=jax.random.key(args.seed + 2),
            evaluate=evaluate,
            num_evals=1,
        )
        live = autosize.live_units(state.params)
        name = "sgd" if norm is None else f"{norm} reg={reg:g}"
        rows.append(
            {
                "name": name,
                "norm": norm,
                "reg": reg,
                "steps": args.steps,
                "test_accuracy": float(history.test_accuracy[-1]),
                "final_train_loss": float(np.mean(history.loss[-max(1, args.steps // 10) :])),
                "live": live,
                "seconds": time.perf_counter() - start,
            }
        )
        trained[name] = state.params
        print(f"{name:>18}: accuracy {rows[-1]['test_accuracy']:.4f}, live {live}", flush=True)
    return rows, trained


def pick_for_shrink(rows: list[dict], tolerance: float) -> dict:
    """The run with the fewest live hidden units among those within ``tolerance`` of SGD."""
    baseline = next(r["test_accuracy"] for r in rows if r["norm"] is None)
    ok = [r for r in rows if r["norm"] and r["test_accuracy"] >= baseline - tolerance]
    hidden = lambda r: r["live"]["Dense_0"] + r["live"]["Dense_1"]
    return min(ok, key=hidden) if ok else min(rows, key=hidden)


def inference(args, params, dataset: data_lib.Dataset) -> dict:
    small, widths = autosize.shrink(jax.device_get(params), CHAIN)
    small = jax.tree.map(np.asarray, small)
    big_model = zoo.make_model("mlp")
    small_model = zoo.MLP(hidden=(widths["Dense_0"], widths["Dense_1"]))
    x = data_lib.normalize(dataset.test_images[: args.inference_batch])
    big = jax.jit(lambda p, x: big_model.apply({"params": p}, x))
    shrunk = jax.jit(lambda p, x: small_model.apply({"params": p}, x))
    max_diff = float(np.max(np.abs(np.asarray(big(params, x)) - np.asarray(shrunk(small, x)))))
    with timing_lock():
        timings = benchmarking.time_interleaved(
            {"original": (big, (params, x)), "shrunk": (shrunk, (small, x))},
            baseline="original",
            repeats=args.repeats,
            number=args.number,
        )
    count = lambda p: int(sum(np.size(v) for v in jax.tree.leaves(p)))
    return {
        "widths": widths,
        "batch": args.inference_batch,
        "max_abs_output_difference": max_diff,
        "parameters": {"original": count(params), "shrunk": count(small)},
        "median_ms": {k: t.median * 1e3 for k, t in timings.items()},
        "speedup": 1.0 / timings["shrunk"].ratio,
        "memory": {k: t.memory for k, t in timings.items()},
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for norm, marker in [(None, "s"), ("l21", "o"), ("linf1", "^")]:
        sel = [r for r in rows if r["norm"] == norm]
        if not sel:
            continue
        live = [r["live"]["Dense_0"] + r["live"]["Dense_1"] for r in sel]
        ax.plot(live, [r["test_accuracy"] for r in sel], marker, label=norm or "sgd")
        for r, n in zip(sel, live, strict=True):
            if r["norm"]:
                ax.annotate(f"{r['reg']:g}", (n, r["test_accuracy"]), fontsize=7)
    ax.set(
        xlabel="live hidden units (of 2048)",
        ylabel="test accuracy",
        title="MLP 784-1024-1024-10 on MNIST, SGD + group sparsity",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(args, command: str, over: dict, rows: list[dict], chosen: dict, inf: dict) -> str:
    lines = [
        "# Proximal auto-sizing: overhead, reg sweep, shrink",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {benchmarking.environment()['device_kind']}, "
        f"{benchmarking.environment()['cpu_count']} CPU cores (shared with other jobs).",
        "",
        "## Step overhead (MLP 784-1024-1024-10, batch "
        f"{args.batch_size}, interleaved medians of {args.repeats} x {args.number})",
        "",
        "| step | median ms | ratio vs SGD | goal | met | compiled memory MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in over.items():
        norm = name.split("+")[-1]
        goal = GOALS.get(norm)
        met = "-" if goal is None else ("yes" if r["ratio"] <= goal else "**no**")
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.3f} | "
            f"{'-' if goal is None else f'<= {goal:.2f}'} | {met} | "
            f"{r['memory']['total'] / 2**20:.1f} |"
        )
    lines += [
        "",
        f"## Sweep of reg ({args.steps} steps of batch {args.batch_size}, SGD lr {SGD_LR}, "
        f"prox lr {PROX_LR})",
        "",
        "| run | test accuracy | live Dense_0 | live Dense_1 | train loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['test_accuracy']:.4f} | {r['live']['Dense_0']}/1024 | "
            f"{r['live']['Dense_1']}/1024 | {r['final_train_loss']:.4f} |"
        )
    lines += [
        "",
        "![sweep](proximal/sweep.png)",
        "",
        f"## Shrink and inference ({chosen['name']}, batch {inf['batch']})",
        "",
        f"Widths after `autosize.shrink`: {inf['widths']}; parameters "
        f"{inf['parameters']['original']:,} -> {inf['parameters']['shrunk']:,}; largest output "
        f"difference {inf['max_abs_output_difference']:.2e}.",
        "",
        "| model | median ms | compiled memory MB |",
        "|---|---|---|",
    ]
    for k in ("original", "shrunk"):
        lines.append(
            f"| {k} | {inf['median_ms'][k]:.3f} | {inf['memory'][k]['total'] / 2**20:.1f} |"
        )
    lines += ["", f"Inference speed-up of the shrunk model: **{inf['speedup']:.2f}x**.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps per sweep run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--l21", type=float, nargs="*", default=[0.01, 0.03])
    parser.add_argument("--linf1", type=float, nargs="*", default=[0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--inference-batch", type=int, default=1000)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="accuracy loss allowed for the model that is shrunk",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sweep", action="store_true", help="only the overhead timing")
    parser.add_argument("--skip-overhead", action="store_true", help="no overhead timing")
    parser.add_argument(
        "--shrink-run", default=None, help='the sweep run to shrink, e.g. "l21 reg=0.03"'
    )
    parser.add_argument(
        "--newton-stats",
        type=int,
        nargs="*",
        default=None,
        help="only the untimed linf1 threshold diagnostics, after these training steps",
    )
    parser.add_argument(
        "--overhead-after",
        type=int,
        default=0,
        help="time the steps at the parameters after this many steps of linf1 training "
        "(default 0: at initialisation)",
    )
    parser.add_argument("--quick", action="store_true", help="a fast sanity run")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.number = 20, 3, 1
        args.l21, args.linf1 = [0.03], [0.3]
    out = Path(args.output)
    raw = out / "proximal"
    raw.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_proximal " + " ".join(argv)
    if args.newton_stats is not None:
        stats = newton_stats(args, data_lib.load("mnist"))
        print(json.dumps(stats))
        benchmarking.write_json(raw / "newton_stats.json", {"command": command, **stats})
        return
    # The untimed training first: the timed sections may wait for the shared lock.
    rows = trained = chosen = inf = None
    if not args.skip_sweep:
        dataset = data_lib.load("mnist")
        rows, trained = sweep(args, dataset)
        plot(rows, raw / "sweep.png")
        benchmarking.write_json(raw / "sweep.json", {"command": command, "rows": rows})
        if args.shrink_run:
            chosen = next(r for r in rows if r["name"] == args.shrink_run)
        else:
            chosen = pick_for_shrink(rows, args.tolerance)
        inf = inference(args, trained[chosen["name"]], dataset)
        print(f"shrunk {chosen['name']}: widths {inf['widths']}, speed-up {inf['speedup']:.2f}x")
        benchmarking.write_json(
            raw / "inference.json", {"command": command, "run": chosen["name"], **inf}
        )
    if args.skip_overhead:
        return
    print("overhead ...", flush=True)
    over = overhead(args)
    for name, r in over.items():
        print(f"{name:>10}: {r['median_ms']:.2f} ms, ratio {r['ratio']:.3f}", flush=True)
    name = (
        "overhead.json" if args.overhead_after == 0 else f"overhead_after{args.overhead_after}.json"
    )
    benchmarking.write_json(raw / name, {"command": command, "goals": GOALS, "results": over})
    if args.skip_sweep:
        return
    (out / "proximal.md").write_text(markdown(args, command, over, rows, chosen, inf))


if __name__ == "__main__":
    main(sys.argv[1:])
