"""Session 5 (notes.md): formulations of the BackPACK CNN's ``Conv_1`` multi-column kernel
statistic (``sum_sq`` over 9 columns, N = 64, 1.8 GFLOP), timed side by side.

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python \
        benchmarks/experiments/stat_experiment.py old,new,chunk4,kmid,dk,rowsum

Comma-separated candidate names (the first is the baseline); ``R`` sets the repeats,
``TIME=0`` only checks the values against ``old``.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_suite import benchmarking
from jaxopt_suite.curvature import EngineConfig, rules
from jaxopt_suite.curvature.layers import ConvConfig
from jaxopt_suite.curvature.rules import conv

N, K, P, S, C, O = 64, 9, 64, 25, 20, 50
D = S * C
kp, kd = jax.random.split(jax.random.key(0))
patches = jax.random.normal(kp, (N, P, S, C))
delta = jax.random.normal(kd, (K, N, 8, 8, O))
cfg = ConvConfig((5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1)


def old(p, d):
    """The chunked batched product (the engine before session 5)."""
    return rules.conv_kernel("sum_sq", p, d, cfg, EngineConfig(per_sample_product=1 << 62))


def new(p, d):
    """One 2-D product per sample, squares accumulated elementwise (the engine now)."""
    return conv._conv_kernel_sum_sq_per_sample(p, d, cfg)


def chunked(chunk, mid):
    """Batched product over chunks of samples, squares summed inside the loop over the
    innermost columns (``mid=False``) or with the columns outside the channels."""

    def f(p, d):
        lhs = p.reshape(N // chunk, chunk, P, D)
        order = (1, 2, 0, 3) if mid else (1, 2, 3, 0)
        rhs = d.reshape(K, N, P, O).transpose(order).reshape(N // chunk, chunk, P, K * O)

        def step(acc, lr):
            g = lax.dot_general(lr[0], lr[1], (((1,), (1,)), ((0,), (0,))))
            g = g.reshape(chunk, D, K, O) if mid else g.reshape(chunk, D, O, K)
            return acc + jnp.sum(g * g, axis=(0, 2) if mid else (0, 3)), None

        return lax.scan(step, jnp.zeros((D, O)), (lhs, rhs))[0].reshape(5, 5, C, O)

    return f


def per_sample_dk(p, d):
    """Per-sample 2-D product with a (D, K·C_out) accumulator."""
    lhs = p.reshape(N, P, D)
    rhs = d.reshape(K, N, P, O).transpose(1, 2, 0, 3).reshape(N, P, K * O)

    def step(acc, xy):
        g = lax.dot_general(xy[0], xy[1], (((0,), (0,)), ((), ())))
        return acc + g * g, None

    acc = lax.scan(step, jnp.zeros((D, K * O)), (lhs, rhs))[0]
    return jnp.sum(acc.reshape(D, K, O), axis=1).reshape(5, 5, C, O)


def rowsum(p, d):
    """Reference, not the statistic: the same FLOPs as one 2-D product with N·D rows."""
    lhs = p.reshape(N * D, P)
    rhs = d.reshape(K, N, P, O)[:, 0].transpose(1, 0, 2).reshape(P, K * O)
    return jnp.sum((lhs @ rhs) ** 2, axis=0)


CANDIDATES = {
    "old": old,
    "new": new,
    "chunk4": chunked(4, False),
    "kmid": chunked(8, True),
    "dk": per_sample_dk,
    "rowsum": rowsum,
}

if __name__ == "__main__":
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CANDIDATES)
    ref = np.asarray(jax.jit(old)(patches, delta))
    fns = {}
    for name in names:
        f = jax.jit(CANDIDATES[name])
        if name != "rowsum":
            out = np.asarray(f(patches, delta))
            print(
                f"{name:8s} max rel diff vs old {np.abs(out - ref).max() / np.abs(ref).max():.1e}"
            )
        fns[name] = (f, (patches, delta))
    if os.environ.get("TIME", "1") == "1":
        print("load", os.getloadavg(), flush=True)
        res = benchmarking.time_interleaved(
            fns, baseline=names[0], repeats=int(os.environ.get("R", 11)), number=3
        )
        for name, t in res.items():
            print(
                f"{name:8s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}  {1.84 / t.median:.0f} GFLOP/s"
            )
        print("load", os.getloadavg())
