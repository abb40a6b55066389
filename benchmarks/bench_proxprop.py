"""ProxProp benchmarks: step-time overhead against plain backprop, and the paper's training
comparison at CPU scale.

``overhead`` (the default): one jitted training step (Nesterov SGD) of the MLP 784-1000-1000-10
with both hidden layers ProxProp, batch 500, timed side by side with the same step using plain
backprop (``benchmarking.time_interleaved``: interleaved rounds, medians after compilation).
Goal: <= 1.4x for prox_cg1 and <= 2.5x for prox_exact. XLA's own FLOP count of each compiled
step is recorded next to the times, as the matmul count to compare with.

``training``: the paper's experiments, shortened. MLP: ProxProp hidden layers (tau 0.05, lr 1)
against backprop (lr 0.05 and the best lr of a small sweep), Nesterov momentum 0.95, batch 500,
on MNIST and Fashion-MNIST; ConvNet: Adam lr 1e-3, ProxProp tau 1 with cg3 and cg10 against
Adam backprop. Records the training loss on a fixed training subset and the test accuracy after
every epoch, with the wall-clock time spent in training steps.

Usage::

  flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_proxprop overhead
  .venv/bin/python -m benchmarks.bench_proxprop training --epochs 3
  .venv/bin/python -m benchmarks.bench_proxprop overhead --quick
"""

from __future__ import annotations

import os

# jaxlib runs Cholesky and triangular solves (prox_exact) through scipy's OpenBLAS, whose worker
# threads spin against XLA's own on a small shared CPU and make those calls 3-5x slower; one
# BLAS thread is the setting measured here (it must be set before scipy loads; override it by
# exporting OPENBLAS_NUM_THREADS). XLA's matmuls do not use OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_suite import benchmarking, train, zoo
from jaxopt_suite import data as data_lib
from jaxopt_suite.proxprop import ProxPropConv, ProxPropDense

RESULTS = Path(__file__).parent / "results"
OUT_DIR = RESULTS / "proxprop"
GOALS = {"prox_cg1": 1.4, "prox_exact": 2.5}


def _mlp(hidden: tuple[int, ...], mode: str | None, tau: float) -> zoo.MLP:
    dense = (
        zoo.MLP.dense
        if mode is None
        else functools.partial(ProxPropDense, tau_prox=tau, optimization_mode=mode)
    )
    return zoo.MLP(hidden=hidden, dense=dense)


def _step_and_state(model, tx, key, batch_size):
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = zoo.init_params(model, key)
    step = jax.jit(train.make_step(problem, tx))
    state = train.init_state(params, tx, key)
    return step, state


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Times one training step per mode against plain backprop."""
    hidden = (64, 64) if args.quick else tuple(args.hidden)
    batch = 32 if args.quick else args.batch_size
    tx = optax.sgd(1.0, momentum=0.95, nesterov=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (batch,)).astype(np.int32)
    fns = {}
    for mode in ["backprop", *args.modes]:
        model = _mlp(hidden, None if mode == "backprop" else mode, args.tau)
        step, state = _step_and_state(model, tx, jax.random.key(0), batch)
        fns[mode] = (step, (state, images, labels))
    flops = {}
    for name, (fn, fargs) in fns.items():
        cost = fn.lower(*fargs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops[name] = float(cost.get("flops", -1)) if cost else -1.0
    timings = benchmarking.time_interleaved(
        fns,
        baseline="backprop",
        repeats=3 if args.quick else args.repeats,
        number=1 if args.quick else args.number,
    )
    rows = []
    for name, t in timings.items():
        rows.append(
            {
                "mode": name,
                "median_ms": t.median * 1e3,
                "ratio": t.ratio,
                "goal": GOALS.get(name),
                "met": None if name not in GOALS else bool(t.ratio <= GOALS[name]),
                "xla_gflops": flops[name] / 1e9,
                "flop_ratio": flops[name] / flops["backprop"],
                "temp_mb": t.memory["temp"] / 2**20,
                "total_mb": t.memory["total"] / 2**20,
                "samples_ms": (t.samples * 1e3).tolist(),
            }
        )
    settings = {
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "hidden": hidden,
        "batch_size": batch,
        "tau_prox": args.tau,
        "optimizer": "sgd lr 1 nesterov momentum 0.95",
        "repeats": args.repeats,
        "number": args.number,
        "quick": args.quick,
    }
    return {"settings": settings, "rows": rows}


def _evaluate_set(problem, images, labels, chunk=2000):
    sums = jax.jit(
        lambda p, x, y: (
            optax.softmax_cross_entropy_with_integer_labels(
                problem.apply_fn(p, data_lib.normalize(x)), y
            ).sum(),
            (problem.apply_fn(p, data_lib.normalize(x)).argmax(-1) == y).sum(),
        )
    )

    def evaluate(params):
        loss, correct = 0.0, 0
        for s in range(0, len(images), chunk):
            ell, c = sums(params, images[s : s + chunk], labels[s : s + chunk])
            loss, correct = loss + float(ell), correct + int(c)
        return loss / len(images), correct / len(images)

    return evaluate


def _train_run(model, tx, dataset, *, epochs, batch_size, seed, train_eval):
    """Trains for whole epochs; after each, the loss on ``train_eval`` training images and the
    test accuracy. Wall-clock counts only the (synchronised) training steps."""
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = zoo.init_params(model, jax.random.key(seed))
    step = train.jit_step(train.make_step(problem, tx))
    state = train.init_state(params, tx, jax.random.key(seed + 1))
    train_loss = _evaluate_set(
        problem, dataset.train_images[:train_eval], dataset.train_labels[:train_eval]
    )
    test = _evaluate_set(problem, dataset.test_images, dataset.test_labels)
    steps_per_epoch = len(dataset.train_labels) // batch_size
    batches = train.epochs(
        jax.random.key(seed + 2), dataset.train_images, dataset.train_labels, batch_size
    )
    images, labels = next(batches)
    compiled = step.lower(state, images, labels).compile()
    history = {"epoch": [0], "wall": [0.0], "train_loss": [], "test_accuracy": []}
    loss0, _ = train_loss(state.params)
    history["train_loss"].append(loss0)
    history["test_accuracy"].append(test(state.params)[1])
    wall = 0.0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            start = time.perf_counter()
            state, value = compiled(state, images, labels)
            value.block_until_ready()
            wall += time.perf_counter() - start
            images, labels = next(batches)
        history["epoch"].append(epoch)
        history["wall"].append(wall)
        history["train_loss"].append(train_loss(state.params)[0])
        history["test_accuracy"].append(test(state.params)[1])
    history["skipped"] = int(state.skipped)
    return history


def training(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's comparisons at CPU scale (see the module docstring)."""
    results: dict[str, Any] = {"mlp": {}, "convnet": {}}
    hidden = (64,) if args.quick else tuple(args.hidden)
    run = functools.partial(
        _train_run,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        train_eval=args.train_eval,
    )
    for name in args.datasets:
        dataset = data_lib.load(name)
        if args.quick:
            dataset = dataset._replace(
                train_images=dataset.train_images[:2000], train_labels=dataset.train_labels[:2000]
            )
        nesterov = lambda lr: optax.sgd(lr, momentum=0.95, nesterov=True)
        if "mlp" in args.nets:
            runs: dict[str, Any] = {}
            sweep = {}
            for lr in args.sweep:
                sweep[lr] = _train_run(
                    _mlp(hidden, None, 0),
                    nesterov(lr),
                    dataset,
                    epochs=1,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    train_eval=args.train_eval,
                )["train_loss"][-1]
                print(
                    f"{name} sweep backprop lr {lr}: loss after 1 epoch {sweep[lr]:.4f}", flush=True
                )
            best = min(sweep, key=lambda lr: sweep[lr] if np.isfinite(sweep[lr]) else np.inf)
            configs = {"backprop lr 0.05": (_mlp(hidden, None, 0), nesterov(0.05))}
            if best != 0.05:
                configs[f"backprop lr {best} (best of sweep)"] = (
                    _mlp(hidden, None, 0),
                    nesterov(best),
                )
            for mode in args.mlp_modes:
                configs[f"proxprop {mode} tau 0.05 lr 1"] = (
                    _mlp(hidden, mode, 0.05),
                    nesterov(1.0),
                )
            for label, (model, tx) in configs.items():
                runs[label] = run(model, tx, dataset)
                h = runs[label]
                print(
                    f"{name} MLP {label}: train loss {np.round(h['train_loss'], 4).tolist()} "
                    f"test acc {np.round(h['test_accuracy'], 4).tolist()} "
                    f"wall {np.round(h['wall'], 1).tolist()}",
                    flush=True,
                )
            results["mlp"][name] = {"sweep": sweep, "best_lr": best, "runs": runs}
        if "convnet" not in args.nets or name not in args.convnet_datasets:
            continue
        if args.conv_train_size:
            dataset = dataset._replace(
                train_images=dataset.train_images[: args.conv_train_size],
                train_labels=dataset.train_labels[: args.conv_train_size],
            )
        conv_runs = {}
        channels = (4, 4, 4) if args.quick else (16, 20, 20)
        conv_configs = {"backprop adam 1e-3": None}
        conv_configs.update({f"proxprop {m} tau 1 adam 1e-3": m for m in args.conv_modes})
        for label, mode in conv_configs.items():
            conv = (
                zoo.ProxPropConvNet.conv
                if mode is None
                else functools.partial(ProxPropConv, tau_prox=1.0, optimization_mode=mode)
            )
            model = zoo.ProxPropConvNet(channels=channels, conv=conv)
            conv_runs[label] = run(model, optax.adam(1e-3), dataset)
            h = conv_runs[label]
            print(
                f"{name} ConvNet {label}: train loss {np.round(h['train_loss'], 4).tolist()} "
                f"test acc {np.round(h['test_accuracy'], 4).tolist()} "
                f"wall {np.round(h['wall'], 1).tolist()}",
                flush=True,
            )
        results["convnet"][name] = {"runs": conv_runs}
    results["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    return results


def _plot_training(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for net in ("mlp", "convnet"):
        for name, res in results[net].items():
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for label, h in res["runs"].items():
                axes[0].plot(h["epoch"], h["train_loss"], "o-", label=label)
                axes[1].plot(h["wall"], h["train_loss"], "o-", label=label)
                axes[2].plot(h["epoch"], h["test_accuracy"], "o-", label=label)
            axes[0].set(xlabel="epoch", ylabel="training loss (fixed subset)", yscale="log")
            axes[1].set(xlabel="seconds in training steps", ylabel="training loss", yscale="log")
            axes[2].set(xlabel="epoch", ylabel="test accuracy")
            axes[0].legend(fontsize=7)
            fig.suptitle(f"ProxProp vs backprop: {net} on {name}")
            fig.tight_layout()
            path = out / f"training_{net}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_proxprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part")
    o = sub.add_parser("overhead", help="step time relative to backprop (default)")
    o.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000])
    o.add_argument("--batch-size", type=int, default=500)
    o.add_argument("--tau", type=float, default=0.05)
    o.add_argument("--modes", nargs="+", default=["gradient", "prox_cg1", "prox_cg3", "prox_exact"])
    o.add_argument("--repeats", type=int, default=15)
    o.add_argument("--number", type=int, default=3)
    o.add_argument("--quick", action="store_true", help="tiny sizes, a sanity run")
    o.add_argument("--output", default=str(OUT_DIR / "overhead.json"))
    t = sub.add_parser("training", help="the paper's comparisons at CPU scale")
    t.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    t.add_argument("--nets", nargs="+", default=["mlp", "convnet"], choices=["mlp", "convnet"])
    t.add_argument("--convnet-datasets", nargs="+", default=["mnist"])
    t.add_argument(
        "--conv-train-size",
        type=int,
        default=15000,
        help="ConvNet epochs run over this many training images (0: all)",
    )
    t.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000])
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=500)
    t.add_argument("--sweep", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    t.add_argument("--mlp-modes", nargs="+", default=["prox_exact", "prox_cg1"])
    t.add_argument("--conv-modes", nargs="+", default=["prox_cg3", "prox_cg10"])
    t.add_argument(
        "--train-eval",
        type=int,
        default=10000,
        help="training images on which the training loss is evaluated",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quick", action="store_true")
    t.add_argument("--output", default=str(OUT_DIR / "training.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    if not argv or argv[0].startswith("-"):
        argv = ["overhead", *argv]
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    if args.part == "overhead":
        payload = overhead(args)
        print(f"{'mode':<12}{'ms':>10}{'ratio':>8}{'flops':>8}{'goal':>6}{'temp MB':>9}")
        for r in payload["rows"]:
            goal = "-" if r["goal"] is None else f"{r['goal']}"
            print(
                f"{r['mode']:<12}{r['median_ms']:>10.2f}{r['ratio']:>8.2f}"
                f"{r['flop_ratio']:>8.2f}{goal:>6}{r['temp_mb']:>9.1f}"
            )
    else:
        payload = training(args)
        if not args.quick:
            payload["plots"] = [p.name for p in _plot_training(payload, Path(args.output).parent)]
    payload["command"] = "python -m benchmarks.bench_proxprop " + " ".join(argv)
    payload["seconds"] = time.perf_counter() - started
    path = benchmarking.write_json(args.output, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
