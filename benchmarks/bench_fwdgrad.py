"""Forward gradient against backprop: step time, compiled memory, and training on MNIST.

``speed``: one training step (``train.make_step``: loss, direction, SGD update, non-finite
guard) for backprop and for forward gradients with each kind of direction, timed side by side
(interleaved, median of repeats, after compilation) on the seed's MLP 784-1024-1024-10 at
N = 64 and N = 1024 and on the seed's CNN at N = 64. The goal of issue 7: forward-gradient step
<= 0.6x the backprop step, compiled memory <= backprop's.

``train``: MNIST, batch 64, the same steps and batches for every run: SGD with the seed's
schedule lr * exp(-1e-4 step), and Adam; backprop vs forward gradient (K = 1 and K = 4).
Test accuracy and loss per step and per second of training.

    flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_fwdgrad speed
    .venv/bin/python -m benchmarks.bench_fwdgrad train
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import benchmarking, fwdgrad, train, zoo
from jaxopt_suite import data as data_lib
from jaxopt_suite.harness import recipes

RESULTS = Path(__file__).parent / "results" / "fwdgrad"

RADEMACHER_RANK_ONE = {"distribution": "rademacher", "structure": "rank_one"}
ONE_LAYER = {**RADEMACHER_RANK_ONE, "perturb": "one_layer"}

# name -> (keyword arguments of fwdgrad.forward_gradient, key implementation)
ESTIMATORS = {
    "fwd normal dense (paper)": ({"distribution": "normal", "structure": "dense"}, "threefry2x32"),
    "fwd normal dense, rbg key": ({"distribution": "normal", "structure": "dense"}, "rbg"),
    "fwd rademacher dense": ({"distribution": "rademacher", "structure": "dense"}, "threefry2x32"),
    "fwd normal rank-one": ({"distribution": "normal", "structure": "rank_one"}, "threefry2x32"),
    "fwd rademacher rank-one": (RADEMACHER_RANK_ONE, "threefry2x32"),
    "fwd rademacher rank-one, one layer": (ONE_LAYER, "threefry2x32"),
    "fwd rademacher rank-one, one layer by size": (
        {**ONE_LAYER, "layer_probabilities": "size"},
        "threefry2x32",
    ),
    "fwd normal rank-one, one layer": (
        {**ONE_LAYER, "distribution": "normal"},
        "threefry2x32",
    ),
    "fwd rademacher rank-one K=4": ({**RADEMACHER_RANK_ONE, "num_directions": 4}, "threefry2x32"),
    "fwd rademacher rank-one K=4 scan": (
        {**RADEMACHER_RANK_ONE, "num_directions": 4, "batching": "scan"},
        "threefry2x32",
    ),
    "fwd rademacher rank-one, one layer K=4 scan": (
        {**ONE_LAYER, "num_directions": 4, "batching": "scan"},
        "threefry2x32",
    ),
}


def _problem(model_name: str):
    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    return train.Problem(lambda p, x: model.apply({"params": p}, x)), params


def _forward_tx(options: dict, impl: str, optimizer, seed: int = 1):
    key = jax.random.key(seed, impl=impl)
    return optax.chain(fwdgrad.forward_gradient(key, **options), optimizer)


def speed(args: argparse.Namespace) -> dict:
    results = {}
    for model_name, batch in args.cases:
        problem, params = _problem(model_name)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8))
        labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
        setups = {"backprop": (optax.sgd(1e-3), train.backprop)}
        for name, (options, impl) in ESTIMATORS.items():
            if name in args.estimators:
                tx = _forward_tx(options, impl, optax.sgd(1e-3))
                setups[name] = (tx, train.value_fn_gradient)
        fns = {}
        for name, (tx, gradient) in setups.items():
            step = jax.jit(train.make_step(problem, tx, gradient))
            state = train.init_state(params, tx, jax.random.key(2))
            fns[name] = (step, (state, images, labels))
        timings = time_chained_interleaved(
            fns, baseline="backprop", repeats=args.repeats, number=args.number, clock=args.clock
        )
        case = f"{model_name} N={batch}"
        results[case] = {name: t._asdict() for name, t in timings.items()}
        print(f"\n{case}")
        for name, t in timings.items():
            print(
                f"  {name:34s} {t.median * 1e3:9.2f} ms  {t.ratio:5.2f}x  "
                f"memory {t.memory['total'] / 2**20:7.1f} MB"
            )
    return results


def time_chained_interleaved(fns, *, baseline, repeats, number, clock="wall", warmup=2):
    """``benchmarking.time_interleaved`` for training steps, with each call fed the state that
    the previous call of the same step returned (as in training).

    A forward-gradient step draws its directions from the key in its state: called again and
    again on one state (``time_interleaved``), a step that perturbs one random layer would
    always perturb the same one, and its time would be that layer's, not the average.
    ``clock="cpu"`` counts process CPU seconds (set up one XLA thread first: ``--clock cpu``):
    on a machine shared with other jobs they do not count the time spent waiting for a core.
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    compiled = {name: (fn.lower(*a).compile(), list(a)) for name, (fn, a) in fns.items()}
    samples = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, (exe, a) in compiled.items():
            start = now()
            for _ in range(number):
                a[0], out = exe(*a)
            jax.block_until_ready(out)
            if r >= warmup:
                samples[name].append((now() - start) / number)
    base = float(np.median(samples[baseline]))
    return {
        name: benchmarking.Timing(
            median=float(np.median(s)),
            samples=np.asarray(s),
            ratio=float(np.median(s)) / base,
            memory=benchmarking.compiled_memory(compiled[name][0]),
        )
        for name, s in samples.items()
    }


def _train_runs(args: argparse.Namespace):
    """name -> (optimizer factory, forward_gradient options or None for backprop).

    The forward-gradient Adam runs use the seed's Adam (lr 2e-4, eps 1e-4, exponential decay);
    see ``benchmarks/results/fwdgrad.md`` for why Adam needs a larger learning rate than SGD
    with forward gradients.
    """
    decay = recipes.sgd_decay
    lr_fwd, lr_adam = args.lr_forward, args.adam_lr_forward
    runs = {
        "backprop SGD": (lambda: optax.sgd(decay(args.lr_backprop)), None),
        "backprop Adam": (lambda: optax.adam(args.adam_lr_backprop), None),
        "fwd SGD K=1": (lambda: optax.sgd(decay(lr_fwd)), RADEMACHER_RANK_ONE),
        "fwd SGD K=4": (
            lambda: optax.sgd(decay(lr_fwd)),
            {**RADEMACHER_RANK_ONE, "num_directions": 4},
        ),
        "fwd SGD one layer": (lambda: optax.sgd(decay(lr_fwd)), ONE_LAYER),
        "fwd Adam K=1": (lambda: optax.adam(decay(lr_adam), eps=1e-4), RADEMACHER_RANK_ONE),
        "fwd Adam one layer": (lambda: optax.adam(decay(lr_adam), eps=1e-4), ONE_LAYER),
    }
    unknown = set(args.runs) - set(runs)
    if unknown:
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; known: {list(runs)}")
    return {k: v for k, v in runs.items() if k in args.runs}


def training(args: argparse.Namespace) -> dict:
    dataset = data_lib.load(args.dataset)
    results = {}
    for model_name in args.models:
        problem, params = _problem(model_name)
        evaluate = train.make_evaluate(problem)
        steps = args.steps if model_name == "mlp" else args.cnn_steps
        for name, (optimizer, options) in _train_runs(args).items():
            if options is None:
                tx, gradient = optimizer(), train.backprop
            else:
                tx = _forward_tx(options, "threefry2x32", optimizer())
                gradient = train.value_fn_gradient
            step = train.jit_step(train.make_step(problem, tx, gradient))
            # a fresh copy: the jitted step donates (deletes) the parameters it is given
            state = train.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(2))
            start = time.perf_counter()
            state, history = train.fit(
                step,
                state,
                dataset,
                steps=steps,
                batch_size=args.batch_size,
                key=jax.random.key(3),
                evaluate=evaluate,
                num_evals=args.num_evals,
            )
            total = time.perf_counter() - start
            h = history._asdict()
            results[f"{model_name} / {name}"] = h
            print(
                f"{model_name:12s} {name:16s} steps {steps:5d} test acc "
                f"{history.test_accuracy[-1]:.4f} test loss {history.test_loss[-1]:.4f} "
                f"train {history.wall[-1]:6.1f} s (total {total:5.1f} s) "
                f"median step {np.median(history.step_time) * 1e3:7.2f} ms",
                flush=True,
            )
    return results


def _plot_training(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({k.split(" / ")[0] for k in results})
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for name, h in results.items():
            if not name.startswith(model + " / "):
                continue
            label = name.split(" / ")[1]
            loss = np.asarray(h["loss"])
            w = max(1, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            axes[row, 0].plot(np.arange(len(smooth)) + w, smooth, label=label)
            axes[row, 1].plot(h["eval_step"], h["test_accuracy"], "o-", label=label)
            axes[row, 2].plot(h["eval_wall"], h["test_accuracy"], "o-", label=label)
        axes[row, 0].set(title=f"{model}: training loss", xlabel="step", yscale="log")
        axes[row, 1].set(title=f"{model}: test accuracy", xlabel="step")
        axes[row, 2].set(title=f"{model}: test accuracy", xlabel="training seconds")
        axes[row, 0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_speed(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (case, timings) in zip(axes[0], results.items(), strict=True):
        names = list(timings)
        ratios = [timings[n]["ratio"] for n in names]
        ax.barh(names, ratios, color=["gray"] + ["C0"] * (len(names) - 1))
        ax.axvline(0.6, color="red", ls="--", label="goal 0.6x")
        ax.set(title=case, xlabel="step time / backprop step")
        ax.invert_yaxis()
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _case(text: str) -> tuple[str, int]:
    model, _, batch = text.partition(":")
    if model not in zoo.MODELS or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL:BATCH with MODEL in {list(zoo.MODELS)}")
    return model, int(batch)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="speed", choices=["speed", "train", "all"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a sanity run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default="", help="suffix of the result files (speed-NAME.json)")
    speed_args = parser.add_argument_group("speed")
    speed_args.add_argument(
        "--cases", type=_case, nargs="+", default=[("mlp", 64), ("mlp", 1024), ("fwdgrad-cnn", 64)]
    )
    speed_args.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    speed_args.add_argument("--repeats", type=int, default=15)
    speed_args.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: one XLA thread, process CPU seconds (for an overloaded shared machine)",
    )
    speed_args.add_argument("--number", type=int, default=3)
    train_args = parser.add_argument_group("train")
    train_args.add_argument("--dataset", default="mnist")
    train_args.add_argument("--models", nargs="+", default=["mlp", "fwdgrad-cnn"])
    train_args.add_argument("--steps", type=int, default=3000, help="MLP steps")
    train_args.add_argument("--cnn-steps", type=int, default=150)
    train_args.add_argument("--batch-size", type=int, default=64)
    train_args.add_argument("--num-evals", type=int, default=6)
    train_args.add_argument("--lr-backprop", type=float, default=0.05)
    train_args.add_argument("--lr-forward", type=float, default=1e-4)
    train_args.add_argument("--adam-lr-backprop", type=float, default=1e-3)
    train_args.add_argument("--adam-lr-forward", type=float, default=2e-4)
    train_args.add_argument(
        "--runs",
        nargs="+",
        default=[
            "backprop SGD",
            "backprop Adam",
            "fwd SGD K=1",
            "fwd SGD K=4",
            "fwd SGD one layer",
            "fwd Adam K=1",
        ],
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu":  # read when the CPU backend starts, i.e. at the first computation
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    if args.quick:
        args.cases = [("mlp-small", 32)]
        args.repeats, args.number = 3, 2
        args.dataset, args.models, args.num_evals = "synthetic", ["mlp-small"], 2
        args.steps = args.cnn_steps = 30
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + (f"-{args.name}" if args.name else "")
    command = "python -m benchmarks.bench_fwdgrad " + " ".join(argv)
    if args.what in ("speed", "all"):
        results = speed(args)
        benchmarking.write_json(
            args.output / f"speed{suffix}.json", {"command": command, "results": results}
        )
        _plot_speed(results, args.output / f"speed{suffix}.png")
    if args.what in ("train", "all"):
        results = training(args)
        payload = {"command": command, "settings": vars(args) | {"output": str(args.output)}}
        benchmarking.write_json(
            args.output / f"train{suffix}.json",
            {**json.loads(json.dumps(payload, default=str)), "results": results},
        )
        _plot_training(results, args.output / f"train{suffix}.png")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
