"""Session 5 (``benchmarks/results/curvature.md``): same-run A/B of the engine's quantities
on the BackPACK CNN (N = 64; ``MODEL=mlp``: the MLP, N = 128) with session 5's two changes
switched off and on, each variant lowered under its switches and timed interleaved against
the plain ``jax.value_and_grad``:

* ``old``: one VJP call per loss-Hessian column (``EngineConfig(column_groups=16)``) and the
  conv kernel gradient from the convolution's VJP (``kernel_grad_from_patches=False``);
* ``groups``: the columns in groups (one ``jax.vmap`` per group, one group per core), kernel
  gradient from the VJP; ``groups3``: three groups;
* ``kpatch``: one call per column, kernel gradient from the patches;
* ``new``: both (the engine's defaults).

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/s5_ab.py \
        diag_ggn_exact old,new

The first argument is a comma-separated list of quantities (each timed in its own round of
variants), the second the variants; ``R`` sets the repeats.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import benchmarking, curvature, zoo

MODEL = os.environ.get("MODEL", "backpack-cnn")
N = 128 if MODEL == "mlp" else 64
key = jax.random.key(0)
model = zoo.make_model(MODEL)
X = jax.random.normal(jax.random.key(7), (N, 28, 28, 1))
Y = jnp.arange(N) % 10
params = zoo.init_params(model, key)

VARIANTS = {
    "old": curvature.EngineConfig(column_groups=16, kernel_grad_from_patches=False),
    "groups": curvature.EngineConfig(kernel_grad_from_patches=False),
    "groups3": curvature.EngineConfig(column_groups=3, kernel_grad_from_patches=False),
    "kpatch": curvature.EngineConfig(column_groups=16),
    "new": curvature.EngineConfig(),
}


def apply(p, x):
    return model.apply({"params": p}, x)


def loss(p, x, y):
    return -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(N), y])


class Lowered:
    """A function lowered now, for ``time_interleaved``."""

    def __init__(self, fn, args):
        self.lowered = jax.jit(fn).lower(*args)

    def lower(self, *args):
        return self.lowered


def engine_fn(quantity, config):
    f = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(quantity,), config=config)
    return lambda p, x, y, k: f(p, x, y, key=k)


quantities = sys.argv[1].split(",") if len(sys.argv) > 1 else ["diag_ggn_exact"]
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["old", "new"]
args = (params, X, Y, key)
for q in quantities:
    fns = {"grad": (jax.jit(jax.value_and_grad(loss)), args[:3])}
    outs = {}
    for v in variants:
        fns[v] = (Lowered(engine_fn(q, VARIANTS[v]), args), args)
        outs[v] = fns[v][0].lowered.compile()(*args)
    for v in variants[1:]:
        diff = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)),
            outs[variants[0]],
            outs[v],
        )
        print(q, v, "max rel diff vs", variants[0], max(jax.tree.leaves(diff)))
    print("load", os.getloadavg(), flush=True)
    res = benchmarking.time_interleaved(
        fns, baseline="grad", repeats=int(os.environ.get("R", 21)), number=2
    )
    for name, t in res.items():
        lo, hi = np.percentile(t.samples, [25, 75]) * 1e3
        print(
            f"{q:22s} {name:8s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}  p25-p75 {lo:.1f}-{hi:.1f}"
        )
    print("load", os.getloadavg(), flush=True)
