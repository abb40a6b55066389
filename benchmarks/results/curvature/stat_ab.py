"""Session 5 (notes.md): same-run A/B of the engine's CNN ``diag_ggn_exact`` with the
per-sample conv statistic off (``old``: threshold raised) and on (``new``); ``new0`` also sends
``Conv_0`` through it instead of ``_conv_kernel_few_weights``.

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/results/curvature/stat_ab.py old,new

``R`` sets the repeats.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import benchmarking, curvature, zoo
from jaxopt_suite.curvature import rules

N = 64
key = jax.random.key(0)
model = zoo.make_model("backpack-cnn")
X = jax.random.normal(jax.random.key(7), (N, 28, 28, 1))
Y = jnp.arange(N) % 10
params = zoo.init_params(model, key)


def apply(p, x):
    return model.apply({"params": p}, x)


def loss(p, x, y):
    return -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(N), y])


class Lowered:
    """A function lowered now (under the current switches), for ``time_interleaved``."""

    def __init__(self, fn, args):
        self.lowered = jax.jit(fn).lower(*args)

    def lower(self, *args):
        return self.lowered


def engine(quantity):
    f = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(quantity,))
    return lambda p, x, y, k: f(p, x, y, key=k)


args = (params, X, Y, key)
fns = {"grad": (jax.jit(jax.grad(loss)), args[:3])}
few_weights = rules._conv_kernel_few_weights


def few_weights_per_sample(statistic, p, d, c):
    if statistic == "sum_sq":
        return rules._conv_kernel_sum_sq_per_sample(p, d, c)
    return few_weights(statistic, p, d, c)


variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["old", "new"]
outs = {}
for v in variants:
    rules._PER_SAMPLE_PRODUCT = 1 << 62 if v == "old" else 1 << 16
    rules._conv_kernel_few_weights = few_weights_per_sample if v == "new0" else few_weights
    fns[v] = (Lowered(engine("diag_ggn_exact"), args), args)
    outs[v] = fns[v][0].lowered.compile()(*args)[2]["diag_ggn_exact"]
rules._conv_kernel_few_weights = few_weights
for v in variants[1:]:
    diff = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))),
        outs[variants[0]],
        outs[v],
    )
    print(v, "max rel diff vs", variants[0], max(jax.tree.leaves(diff)))
print("load", os.getloadavg(), flush=True)
res = benchmarking.time_interleaved(
    fns, baseline="grad", repeats=int(os.environ.get("R", 11)), number=2
)
for name, t in res.items():
    lo, hi = np.percentile(t.samples, [25, 75]) * 1e3
    print(f"{name:8s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}  p25-p75 {lo:.1f}-{hi:.1f}")
print("load", os.getloadavg())
