"""What dropout costs the curvature engine's generic path.

A model with a GroupNorm (its scale and bias take the generic path) between two Dense layers,
with and without dropout. Without dropout the generic path differentiates each sample alone;
with it, to keep the batch's dropout mask, one VJP of the whole batch per sample
(``generic.sample_vjp(batched=True)``), N times the backward work. Each quantity's time is
over the plain ``jax.value_and_grad`` of the deterministic model (interleaved, median of
repeats, after compilation), with XLA's compiled scratch memory.

Run: ``flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_random_models``
Writes ``benchmarks/results/random_models.json`` and ``benchmarks/results/random_models.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import flax.linen as nn
import jax

from jaxopt_suite import curvature
from jaxopt_suite.harness import benchmarking, train

RESULTS = Path(__file__).parent / "results"


class NormMLP(nn.Module):
    hidden: int
    rate: float

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.GroupNorm(num_groups=8)(nn.Dense(self.hidden)(x)))
        h = nn.Dropout(self.rate, deterministic=self.rate == 0.0)(h)
        return nn.Dense(10)(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--quantities", nargs="+", default=["grad_batch", "diag_ggn_exact"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    dropout_key = jax.random.key(3)
    rows = {}
    load_before = os.getloadavg()[0]
    for n in args.batches:
        x = jax.random.normal(jax.random.key(0), (n, args.features))
        y = jax.random.randint(jax.random.key(1), (n,), 0, 10)
        models = {"deterministic": NormMLP(args.hidden, 0.0), "dropout": NormMLP(args.hidden, 0.5)}
        params = models["deterministic"].init(jax.random.key(2), x)["params"]
        applies = {
            label: (lambda p, x, m=m: m.apply({"params": p}, x, rngs={"dropout": dropout_key}))
            for label, m in models.items()
        }
        plain = applies["deterministic"]
        loss = lambda p, x, y, plain=plain: train.cross_entropy(plain(p, x), y)
        fns = {"gradient": (jax.jit(jax.value_and_grad(loss)), (params, x, y))}
        for q in args.quantities:
            for label, apply_fn in applies.items():
                fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=(q,))
                fns[f"{q} / {label}"] = (jax.jit(fn), (params, x, y))
        timings = benchmarking.time_interleaved(
            fns, baseline="gradient", repeats=args.repeats, number=1
        )
        for name, tm in timings.items():
            rows[f"N = {n}: {name}"] = {
                "median_ms": tm.median * 1e3,
                "ratio": tm.ratio,
                "temp_bytes": tm.memory["temp"],
            }
    load_after = os.getloadavg()[0]
    batches = " ".join(map(str, args.batches))
    command = (
        f"python -m benchmarks.bench_random_models --batches {batches} --features "
        f"{args.features} --hidden {args.hidden} --quantities {' '.join(args.quantities)} "
        f"--repeats {args.repeats}"
    )
    benchmarking.write_json(
        RESULTS / "random_models.json",
        {"command": command, "load": [load_before, load_after], "results": rows},
    )
    lines = [
        "# Dropout on the curvature engine's generic path (issue 17)",
        "",
        f"Dense({args.features} -> {args.hidden}) - GroupNorm(8) - tanh - [dropout 0.5] - "
        f"Dense(10); x the deterministic model's plain gradient, interleaved medians of "
        f"{args.repeats}; load {load_before:.1f} -> {load_after:.1f}.",
        f"Command: `{command}`",
        "",
        "| batch: quantity / model | ms | x gradient | compiled scratch MiB |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        mib = r["temp_bytes"] / 2**20
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.2f} | {mib:.2f} |")
        print(f"{name:44s} {r['median_ms']:8.2f} ms  x{r['ratio']:.2f}  {mib:.2f} MiB", flush=True)
    (RESULTS / "random_models.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
