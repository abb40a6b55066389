"""BackPACK's seed example (diag-GGN-MC preconditioned SGD, issue 5) over several seeds, in
JAX and in BackPACK itself, on the same bundled MNIST.

The seed (``../shared/seeds/001_*``): the BackPACK CNN, batch 64, step 0.01, damping 1,
100 iterations, mini-batch accuracy measured before each step. Its printed run ends at
86-95 %. This script runs that loop for ``--seeds`` seeds with ``jaxopt_suite`` and (with the
``compare`` extra installed) with BackPACK's ``DiagGGNMC`` and PyTorch's default
initialisation, and reports the mean mini-batch accuracy of the last 10 iterations per seed.
Accuracy only: nothing here is timed. ``--plain-sgd`` adds each loop with G = 0 (SGD with
step 0.01): since G >= 0 and the damping is 1, the preconditioned step is never longer than
that one, entry by entry.

Run: ``.venv/bin/python -m benchmarks.seed_diag_ggn`` (about 2 minutes on 2 CPU cores).
Writes ``benchmarks/results/seed_diag_ggn.json`` and ``benchmarks/results/seed_diag_ggn.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import numpy as np

from benchmarks import torch_models

RESULTS = Path(__file__).parent / "results"
ITERATIONS = 100
READING = "## Reading"


def run_jax(seeds: int, plain: bool = False) -> list[list[float]]:
    """JAX runs (``jaxopt_suite.harness.reproduce.diag_ggn_seed_runs``); ``plain``: the same
    loop with G = 0, i.e. SGD with step 0.01 (the largest step the preconditioned update can
    take, since G >= 0 and the damping is 1)."""
    from jaxopt_suite import data
    from jaxopt_suite.harness import reproduce

    return reproduce.diag_ggn_seed_runs(
        data.load_mnist(), seeds, iterations=ITERATIONS, plain=plain
    )


def run_backpack(seeds: int, plain: bool = False) -> list[list[float]]:
    """BackPACK's own loop; ``plain``: G replaced by 0 (SGD with step 0.01, the bound)."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC

    from jaxopt_suite import data

    torch.set_num_threads(os.cpu_count() or 1)
    mnist = data.load_mnist()
    x_all = (mnist.train_images.astype(np.float32) / 255.0 - data.MNIST_MEAN) / data.MNIST_STD
    images = torch.tensor(x_all[:, None])
    labels = torch.tensor(mnist.train_labels.astype(np.int64))
    runs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = torch_models.backpack_cnn()
        loss_function = torch.nn.CrossEntropyLoss()
        extend(model)
        extend(loss_function)
        order = torch.randperm(len(images))
        accs = []
        for i in range(ITERATIONS + 1):
            idx = order[64 * i : 64 * (i + 1)]
            output = model(images[idx])
            accs.append((output.argmax(1) == labels[idx]).float().mean().item())
            with backpack(DiagGGNMC()):
                loss_function(output, labels[idx]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    curvature = 0.0 if plain else p.diag_ggn_mc
                    p.add_(p.grad / (curvature + 1.0), alpha=-0.01)
                    p.grad = None
        runs.append(accs)
        name = "backpack sgd" if plain else "backpack"
        print(f"{name} seed {seed}: last-10 mean {np.mean(accs[-10:]):.3f}", flush=True)
    return runs


def summary(runs: list[list[float]]) -> dict:
    last10 = [float(np.mean(a[-10:])) for a in runs]
    return {
        "last10_per_seed": last10,
        "mean": float(np.mean(last10)),
        "min": float(np.min(last10)),
        "max": float(np.max(last10)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--jax-only", action="store_true")
    parser.add_argument(
        "--plain-sgd",
        action="store_true",
        help="also run each loop with G = 0 (SGD, step 0.01): the bound on what damping 1 allows",
    )
    args = parser.parse_args()
    from jaxopt_suite import benchmarking

    result = {"jax": summary(run_jax(args.seeds))}
    if args.plain_sgd:
        result["jax, G = 0 (SGD)"] = summary(run_jax(args.seeds, plain=True))
    if not args.jax_only:
        try:
            result["backpack"] = summary(run_backpack(args.seeds))
            if args.plain_sgd:
                result["backpack, G = 0 (SGD)"] = summary(run_backpack(args.seeds, plain=True))
        except ImportError as err:  # the compare extra is not installed
            print(f"BackPACK skipped: {err}")
    result["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(parents=True, exist_ok=True)
    benchmarking.write_json(RESULTS / "seed_diag_ggn.json", result)
    lines = [
        "# BackPACK's seed example over seeds (issue 5)",
        "",
        "diag-GGN-MC preconditioned SGD (step 0.01, damping 1), the BackPACK CNN, MNIST, batch 64,",
        f"{ITERATIONS} iterations; mean mini-batch accuracy of the last 10 iterations (measured",
        "before each step, as in the seed), per seed. Same bundled MNIST for both; each framework",
        "uses its own default initialisation (Flax: LeCun normal, zero bias; PyTorch: uniform",
        "±1/√fan_in). Command: `.venv/bin/python -m benchmarks.seed_diag_ggn"
        f"{' --plain-sgd' if args.plain_sgd else ''}` ({result['date']} UTC).",
        "",
        "| implementation | mean over seeds | min | max | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, r in result.items():
        if name == "date":
            continue
        per = ", ".join(f"{a * 100:.0f}" for a in r["last10_per_seed"])
        lines.append(
            f"| {name} | {r['mean'] * 100:.1f} % | {r['min'] * 100:.1f} % |"
            f" {r['max'] * 100:.1f} % | {per} |"
        )
    out = RESULTS / "seed_diag_ggn.md"
    # a hand-written reading below the table survives re-runs
    kept = out.read_text().partition(READING)[2] if out.exists() else ""
    text = "\n".join(lines) + "\n" + (f"\n{READING}{kept}" if kept else "")
    out.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
