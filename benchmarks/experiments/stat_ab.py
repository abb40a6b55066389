"""Session 5 (notes.md): same-run A/B of the engine's CNN ``diag_ggn_exact`` with the
per-sample conv statistic off (``old``: ``EngineConfig.per_sample_product`` raised) and on
(``new``); ``new0`` also sends ``Conv_0`` through it (``conv_few_weights=False`` and the
threshold at 0).

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/stat_ab.py old,new

``R`` sets the repeats.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import benchmarking, curvature, zoo

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
    """A function lowered now, for ``time_interleaved``."""

    def __init__(self, fn, args):
        self.lowered = jax.jit(fn).lower(*args)

    def lower(self, *args):
        return self.lowered


def engine(quantity, config):
    f = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(quantity,), config=config)
    return lambda p, x, y, k: f(p, x, y, key=k)


args = (params, X, Y, key)
fns = {"grad": (jax.jit(jax.grad(loss)), args[:3])}
VARIANTS = {
    "old": curvature.EngineConfig(per_sample_product=1 << 62),
    "new": curvature.EngineConfig(),
    "new0": curvature.EngineConfig(conv_few_weights=False, per_sample_product=0),
}

variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["old", "new"]
outs = {}
for v in variants:
    fns[v] = (Lowered(engine("diag_ggn_exact", VARIANTS[v]), args), args)
    outs[v] = fns[v][0].lowered.compile()(*args)[2]["diag_ggn_exact"]
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
