"""Same-run A/B of the engine with and without the banded conv input cotangent (notes.md).

Run from the repository root under the benchmark lock:
``flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/band_ab.py``
(``R=11`` sets the repeats). The "noband" variants (``EngineConfig(banded_conv_cotangent=False)``)
keep the mask backward of max-pooling.
"""

import os

import jax
import jax.numpy as jnp

from jaxopt_suite import benchmarking, curvature, zoo

N = 64
key = jax.random.key(0)
model = zoo.make_model("backpack-cnn")
X = jax.random.normal(jax.random.key(7), (N, 28, 28, 1))
Y = jnp.arange(N) % 10
params = zoo.init_params(model, key)
apply = lambda p, x: model.apply({"params": p}, x)


def loss(p, x, y):
    return -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(N), y])


class Pre:
    def __init__(self, fn, args):
        self.l = jax.jit(fn).lower(*args)

    def lower(self, *a):
        return self.l


args = (params, X, Y, key)
fns = {"grad": (jax.jit(jax.grad(loss)), args[:3])}


def eng(q, config):
    f = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(q,), config=config)
    return lambda p, x, y, k: f(p, x, y, key=k)


noband = curvature.EngineConfig(banded_conv_cotangent=False)
for q in ("diag_ggn_exact", "diag_ggn_mc"):
    fns[q + "_band"] = (Pre(eng(q, curvature.EngineConfig()), args), args)
    fns[q + "_noband"] = (Pre(eng(q, noband), args), args)
print("load", os.getloadavg())
res = benchmarking.time_interleaved(
    fns, baseline="grad", repeats=int(os.environ.get("R", 11)), number=2
)
for k, t in res.items():
    print(f"{k:26s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}")
