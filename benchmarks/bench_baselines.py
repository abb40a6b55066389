"""Baseline optimizers on the zoo models: step time relative to backprop SGD, compiled memory.

The template every method benchmark follows: build jitted steps with ``train.make_step``, time
them interleaved with ``benchmarking.time_interleaved`` (median of repeats after compilation),
write JSON to ``benchmarks/results/`` and print a markdown table.

    python -m benchmarks.bench_baselines [--models mlp,backpack-cnn] [--batch-size 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import optax

from jaxopt_suite import benchmarking, train, zoo

RESULTS = Path(__file__).parent / "results" / "baselines.json"

OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "sgd-momentum": optax.sgd(0.05, momentum=0.9),
    "adam": optax.adam(1e-3),
}


def steps_for(model_name: str, batch_size: int):
    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    images = np.asarray(
        jax.random.randint(jax.random.key(1), (batch_size, 28, 28), 0, 256), np.uint8
    )
    labels = np.asarray(jax.random.randint(jax.random.key(2), (batch_size,), 0, 10), np.int32)
    fns = {}
    for name, tx in OPTIMIZERS.items():
        state = train.init_state(params, tx, jax.random.key(3))
        fns[name] = (jax.jit(train.make_step(problem, tx)), (state, images, labels))
    return fns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,backpack-cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="few repeats, small model")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats = "mlp-small", 3
    payload = {"batch_size": args.batch_size, "models": {}}
    lines = ["| model | optimizer | step ms | vs sgd | compiled MB |", "|---|---|---|---|---|"]
    for model_name in args.models.split(","):
        timings = benchmarking.time_interleaved(
            steps_for(model_name, args.batch_size), baseline="sgd", repeats=args.repeats
        )
        payload["models"][model_name] = {k: v._asdict() for k, v in timings.items()}
        for name, t in timings.items():
            lines.append(
                f"| {model_name} | {name} | {t.median * 1e3:.2f} | {t.ratio:.2f} | "
                f"{t.memory['total'] / 2**20:.1f} |"
            )
    payload["device_peak_bytes"] = benchmarking.device_peak_memory()
    benchmarking.write_json(RESULTS, payload)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
