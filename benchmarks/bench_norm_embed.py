"""A transformer block through the curvature engine: the LayerNorm/Embed rules against the
engine without them (those leaves on the generic per-sample path) and the generic path alone.

Block: Embed -> pre-LayerNorm single-head attention -> pre-LayerNorm gelu MLP -> LayerNorm ->
logits at every position (cross-entropy per position). Each quantity's time is over the plain
``jax.value_and_grad`` (interleaved, median of repeats, after compilation), with XLA's
compiled scratch memory; structured and generic results are checked equal first.

Run: ``flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_norm_embed``
Writes ``benchmarks/results/norm_embed.json`` and ``benchmarks/results/norm_embed.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import benchmarking, curvature, train

RESULTS = Path(__file__).parent / "results"


class Block(nn.Module):
    vocab: int
    dim: int
    hidden: int

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.dim)(tokens)
        q, k, v = jnp.split(nn.Dense(3 * self.dim)(nn.LayerNorm()(h)), 3, axis=-1)
        w = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(self.dim), axis=-1)
        h = h + nn.Dense(self.dim)(jnp.einsum("nts,nsd->ntd", w, v))
        h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(nn.LayerNorm()(h))))
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


# The engine without the LayerNorm/Embed rules (those leaves go generic).
RULES_OFF = curvature.EngineConfig(
    kinds=tuple(k for k in curvature.registered_kinds() if k not in ("layernorm", "embed"))
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=5,
        default=[32, 64, 128, 1000, 256],
        metavar=("N", "T", "D", "VOCAB", "HIDDEN"),
    )
    parser.add_argument("--quantities", nargs="+", default=["sum_grad_squared", "diag_ggn_mc"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    n, t, d, vocab, hidden = args.shape
    model = Block(vocab, d, hidden)
    tokens = jax.random.randint(jax.random.key(0), (n, t), 0, vocab)
    targets = jax.random.randint(jax.random.key(1), (n, t), 0, vocab)
    params = model.init(jax.random.key(2), tokens)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    key = jax.random.key(3)

    grad = jax.jit(jax.value_and_grad(lambda p, x, y: train.cross_entropy(apply_fn(p, x), y)))
    fns = {"gradient": (grad, (params, tokens, targets))}
    checks = {}
    for q in args.quantities:
        for label, structured, config in (
            ("rules", True, curvature.EngineConfig()),
            ("without rules", True, RULES_OFF),
            ("generic only", False, curvature.EngineConfig()),
        ):
            fn = curvature.value_and_grad(
                apply_fn,
                loss="cross_entropy",
                quantities=(q,),
                structured=structured,
                config=config,
            )
            step = jax.jit(lambda p, x, y, k, fn=fn: fn(p, x, y, key=k))
            out = step(params, tokens, targets, key)[2][q]
            fns[f"{q} / {label}"] = (step, (params, tokens, targets, key))
            checks[label] = out
        checks = {k: jax.tree.leaves(v) for k, v in checks.items()}
        worst = max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(checks["rules"], checks["generic only"], strict=True)
        )
        print(f"{q}: rules vs generic only, max relative difference {worst:.1e}", flush=True)
        checks = {}
    load_before = os.getloadavg()[0]
    timings = benchmarking.time_interleaved(
        fns, baseline="gradient", repeats=args.repeats, number=1
    )
    load_after = os.getloadavg()[0]
    rows = {
        name: {"median_ms": tm.median * 1e3, "ratio": tm.ratio, "memory": tm.memory}
        for name, tm in timings.items()
    }
    shape = " ".join(map(str, args.shape))
    command = f"python -m benchmarks.bench_norm_embed --shape {shape} --repeats {args.repeats}"
    benchmarking.write_json(
        RESULTS / "norm_embed.json",
        {
            "command": command,
            "shape": dict(N=n, T=t, D=d, vocab=vocab, hidden=hidden),
            "load": [load_before, load_after],
            "results": rows,
        },
    )
    lines = [
        "# Transformer block through the curvature engine (issue 6: LayerNorm/Embed rules)",
        "",
        f"N = {n}, T = {t}, D = {d}, vocab {vocab}, MLP hidden {hidden}; x the plain gradient,"
        f" interleaved medians of {args.repeats}; load {load_before:.1f} -> {load_after:.1f}.",
        f"Command: `{command}`",
        "",
        "| quantity / engine | ms | x gradient |",
        "|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['ratio']:.2f} |")
        print(f"{name:34s} {r['median_ms']:8.1f} ms  x{r['ratio']:.2f}", flush=True)
    (RESULTS / "norm_embed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
