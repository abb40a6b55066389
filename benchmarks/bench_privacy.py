"""Per-sample clipping from the curvature engine's one pass against the plain gradient and
against ``optax.contrib.dpsgd`` fed by ``jax.vmap(jax.grad)`` per-sample gradients.

Per model (N samples, cross-entropy), timed side by side (interleaved, median of repeats,
after compilation; ratio over the plain ``jax.value_and_grad`` of the mean loss), with XLA's
compiled memory:

- ``gradient``: ``jax.value_and_grad`` of the mean loss (the baseline);
- ``clipped``: :func:`jaxopt_suite.privacy.clipped_value_and_grad` (the clipped sum and the
  per-sample norms);
- ``dp step``: ``clipped`` followed by :func:`~jaxopt_suite.privacy.dp_aggregate` (noise and
  average);
- ``vmap + optax dpsgd``: ``jax.vmap(jax.grad)`` per-sample gradients into
  ``optax.contrib.dpsgd``'s update (its clipping, noise and average).

The engine's clipped sum is checked equal to clipping the ``vmap`` per-sample gradients first.

Models: ``--models mlp backpack-cnn`` (zoo, MNIST-shaped inputs) and ``transformer``
(``benchmarks.bench_norm_embed.Block``, cross-entropy per token).

Run: ``flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_privacy``
Writes ``benchmarks/results/<out>.json`` and ``<out>.md`` (``--out``, default ``privacy``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from benchmarks.bench_norm_embed import Block
from jaxopt_suite import benchmarking, privacy, zoo

RESULTS = Path(__file__).parent / "results"
MAX_NORM = 1.0
SIGMA = 1.0


def per_example_loss(apply_fn):
    def loss(p, x, y):
        logits = apply_fn(p, x[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).sum()

    return loss


def problem(name: str, n: int, key: jax.Array):
    """``(params, inputs, targets, apply_fn)``: a zoo model on (n, 28, 28, 1) images, or
    ``"transformer"``: bench_norm_embed's block (vocab 1000, width 128, MLP 256) on n
    sequences of 64 tokens, a cross-entropy term per position."""
    if name == "transformer":
        model = Block(1000, 128, 256)
        x = jax.random.randint(jax.random.key(1), (n, 64), 0, 1000)
        y = jax.random.randint(jax.random.key(2), (n, 64), 0, 1000)
        params = model.init(key, x[:1])["params"]
    else:
        model = zoo.make_model(name)
        params = zoo.init_params(model, key)
        x = jax.random.normal(jax.random.key(1), (n, 28, 28, 1))
        y = jax.random.randint(jax.random.key(2), (n,), 0, 10)
    return params, x, y, lambda p, x: model.apply({"params": p}, x)


def functions(name: str, n: int, key: jax.Array):
    params, x, y, apply_fn = problem(name, n, key)

    def mean_loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    clipped = privacy.clipped_value_and_grad(
        apply_fn, loss="cross_entropy", max_norm=MAX_NORM, reduction="sum"
    )
    aggregate = privacy.dp_aggregate(SIGMA, MAX_NORM, n, jax.random.key(3))
    dpsgd = optax.contrib.dpsgd(
        learning_rate=1.0, l2_norm_clip=MAX_NORM, noise_multiplier=SIGMA, seed=3
    )
    per_sample = jax.vmap(jax.grad(per_example_loss(apply_fn)), (None, 0, 0))

    def dp_step(p, x, y, state):
        _, summed, _ = clipped(p, x, y)
        return aggregate.update(summed, state)

    def optax_step(p, x, y, state):
        return dpsgd.update(per_sample(p, x, y), state, p)

    def vmap_clipped(p, x, y):
        grads = per_sample(p, x, y)
        flat = jnp.concatenate([g.reshape(n, -1) for g in jax.tree.leaves(grads)], axis=1)
        w = jnp.minimum(1.0, MAX_NORM / jnp.linalg.norm(flat, axis=1))
        return jax.tree.map(lambda g: jnp.tensordot(w, g, 1), grads)

    args = (params, x, y)
    fns = {
        "gradient": (jax.jit(jax.value_and_grad(mean_loss)), args),
        "clipped": (jax.jit(clipped), args),
        "dp step": (jax.jit(dp_step), (*args, aggregate.init(params))),
        "vmap + optax dpsgd": (jax.jit(optax_step), (*args, dpsgd.init(params))),
    }
    got = jax.jit(clipped)(*args)[1]
    want = jax.jit(vmap_clipped)(*args)
    error = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    return fns, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "backpack-cnn"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="privacy", help="results file stem")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = []
    for name in args.models:
        fns, error = functions(name, args.batch, jax.random.key(0))
        timings = benchmarking.time_interleaved(fns, baseline="gradient", repeats=args.repeats)
        base_memory = timings["gradient"].memory["total"]
        for label, t in timings.items():
            rows.append(
                {
                    "model": name,
                    "N": args.batch,
                    "function": label,
                    "ms": 1e3 * t.median,
                    "ratio": t.ratio,
                    "memory_MiB": t.memory["total"] / 2**20,
                    "memory_ratio": t.memory["total"] / base_memory,
                    "max_rel_error_vs_vmap": error,
                }
            )
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": "python -m benchmarks.bench_privacy "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        ),
        "load_average": load,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "devices": str(jax.devices()),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Per-sample clipping: engine vs plain gradient vs vmap(grad) + optax.contrib.dpsgd",
        "",
        f"Command: `{meta['command']}`; load average before the run {load[0]:.1f}, "
        f"{load[1]:.1f}, {load[2]:.1f}; {meta['devices']}; jax {meta['jax']}.",
        "Median over interleaved repeats after compilation; ratio and memory over the plain "
        "`jax.value_and_grad` of the mean loss in the same run; memory is XLA's compiled total "
        "(arguments + outputs + temporaries). `max rel error` compares the engine's clipped sum "
        "with clipping the `vmap(grad)` per-sample gradients.",
        "",
        "| model | N | function | ms | ratio | memory MiB | memory ratio | max rel error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['N']} | {r['function']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['memory_MiB']:.0f} | {r['memory_ratio']:.2f} | {r['max_rel_error_vs_vmap']:.1e} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
