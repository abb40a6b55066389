"""Activity-perturbed forward gradients and local losses (issue 23) against backprop SGD and the
weight-perturbation forward gradient on the MNIST MLP (784-1024-1024-10).

``speed``: one training step of each method (estimate + SGD update), timed side by side
(``benchmarking.time_interleaved``: interleaved rounds, median, after compilation) at N = 64 and
N = 1024, as ratios to the backprop step. ``train``: the same number of SGD steps for each
method (batch 64, the schedule lr * exp(-1e-4 step) of ``bench_fwdgrad``), test accuracy along
the way, against steps and training seconds.

The local-loss model is the same MLP cut into two blocks: block 1 is Dense(1024)-ReLU with a
linear classifier head Dense(10) of its own (an extra 10 250 parameters used only for its local
loss); block 2 is Dense(1024)-ReLU-Dense(10), the model's output layer being block 2's head.

Run (results in ``benchmarks/results/fwdgrad_activity.{json,md}``)::

    python -m benchmarks.bench_fwdgrad_activity
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import benchmarking, fwdgrad, train, zoo
from jaxopt_suite import data as data_lib
from jaxopt_suite.harness import recipes

RESULTS = Path(__file__).parent / "results"
WIDTH, CLASSES = 1024, 10


def _mlp_problem():
    model = zoo.make_model("mlp")
    params = zoo.init_params(model, jax.random.key(0))
    return train.Problem(lambda p, x: model.apply({"params": p}, x)), params


_HIDDEN, _HEAD = nn.Dense(WIDTH), nn.Dense(CLASSES)


def _block(p, h):
    h = nn.relu(_HIDDEN.apply({"params": p["hidden"]}, h.reshape(h.shape[0], -1)))
    return h, _HEAD.apply({"params": p["head"]}, h)


BLOCKS = [_block, _block]


def _local_problem():
    """The two-block MLP with its first layers initialised as the MLP's are."""
    _, mlp = _mlp_problem()
    head = _HEAD.init(jax.random.key(5), jnp.zeros((1, WIDTH)))["params"]
    params = [
        {"hidden": mlp["Dense_0"], "head": head},
        {"hidden": mlp["Dense_1"], "head": mlp["Dense_2"]},
    ]
    return train.Problem(fwdgrad.chain_blocks(BLOCKS)), params


def _methods(args):
    """name -> (problem and params, gradient function, learning rate)."""
    mlp, local = _mlp_problem(), _local_problem()
    weight = {"distribution": "rademacher", "structure": "rank_one"}
    return {
        "backprop SGD": (mlp, train.backprop, args.lr_backprop, None),
        "weight fwd SGD (rademacher rank-one)": (
            mlp,
            train.value_fn_gradient,
            args.lr_weight,
            weight,
        ),
        "activity fwd SGD": (
            mlp,
            train.activity_gradient(args.k_activity, args.distribution),
            args.lr_activity,
            None,
        ),
        "local losses fwd SGD": (
            local,
            train.local_gradient(BLOCKS, args.k_local, args.distribution),
            args.lr_local,
            None,
        ),
    }


def _tx(lr, weight_options):
    sgd = optax.sgd(recipes.sgd_decay(lr))
    if weight_options is None:
        return sgd
    return optax.chain(fwdgrad.forward_gradient(jax.random.key(1), **weight_options), sgd)


def speed(args) -> dict:
    results = {}
    dataset = data_lib.synthetic(jax.random.key(0))
    for n in args.batches:
        images, labels = dataset.train_images[:n], dataset.train_labels[:n]
        fns = {}
        for name, ((problem, params), gradient, lr, options) in _methods(args).items():
            tx = _tx(lr, options)
            step = jax.jit(train.make_step(problem, tx, gradient))
            state = train.init_state(params, tx, jax.random.key(2))
            fns[name] = (step, (state, images, labels))
        timings = benchmarking.time_interleaved(
            fns, baseline="backprop SGD", repeats=args.repeats, number=args.number
        )
        results[f"mlp N={n}"] = {k: v._asdict() for k, v in timings.items()}
        for name, t in timings.items():
            print(
                f"N={n:5d} {name:38s} {t.median * 1e3:9.2f} ms {t.ratio:5.2f}x "
                f"memory {t.memory['total'] / 2**20:7.1f} MB",
                flush=True,
            )
    return results


def training(args) -> dict:
    dataset = data_lib.load("mnist")
    results = {}
    for name, ((problem, params), gradient, lr, options) in _methods(args).items():
        if name not in args.runs:
            continue
        tx = _tx(lr, options)
        step = train.jit_step(train.make_step(problem, tx, gradient))
        state = train.init_state(params, tx, jax.random.key(2))
        _, history = train.fit(
            step,
            state,
            dataset,
            steps=args.steps,
            batch_size=args.batch_size,
            key=jax.random.key(3),
            evaluate=train.make_evaluate(problem),
            num_evals=args.num_evals,
        )
        results[name] = history._asdict() | {"learning_rate": lr}
        print(
            f"{name:38s} lr {lr:g} steps {args.steps} test acc {history.test_accuracy[-1]:.4f} "
            f"train {history.wall[-1]:6.1f} s median step "
            f"{np.median(history.step_time) * 1e3:7.2f} ms skipped {history.skipped}",
            flush=True,
        )
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=["speed", "train", "all"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default="fwdgrad_activity")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-evals", type=int, default=6)
    parser.add_argument("--lr-backprop", type=float, default=0.05)
    parser.add_argument("--lr-weight", type=float, default=1e-4)
    parser.add_argument("--lr-activity", type=float, default=1e-3)
    parser.add_argument("--lr-local", type=float, default=5e-3)
    parser.add_argument(
        "--distribution", default="rademacher", choices=["rademacher", "normal"], help="tangents"
    )
    parser.add_argument("--k-activity", type=int, default=1, help="tangents per sample")
    parser.add_argument("--k-local", type=int, default=16, help="tangents per sample and block")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[
            "backprop SGD",
            "weight fwd SGD (rademacher rank-one)",
            "activity fwd SGD",
            "local losses fwd SGD",
        ],
    )
    args = parser.parse_args(argv)
    payload = {
        "command": "python -m benchmarks.bench_fwdgrad_activity " + " ".join(argv),
        "settings": vars(args) | {"output": str(args.output)},
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    if args.what in ("speed", "all"):
        payload["speed"] = speed(args)
    if args.what in ("train", "all"):
        payload["train"] = training(args)
    args.output.mkdir(parents=True, exist_ok=True)
    benchmarking.write_json(args.output / f"{args.name}.json", payload)


if __name__ == "__main__":
    main(sys.argv[1:])
