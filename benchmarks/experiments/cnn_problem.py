"""The problem the engine's A/B experiment scripts time: the BackPACK CNN on N = 64 random
images (``MODEL=mlp``: the MLP, N = 128), the plain loss, and the helpers every script uses.

Imported by ``s5_ab.py``, ``stat_ab.py`` and ``band_ab.py``, which run as scripts from the
repository root (their folder is then first on ``sys.path``).
"""

import os

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
args = (params, X, Y, key)


def apply(p, x):
    return model.apply({"params": p}, x)


def loss(p, x, y):
    return -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(N), y])


class Lowered:
    """A function lowered now (under the caller's configuration), for ``time_interleaved``."""

    def __init__(self, fn, fn_args):
        self.lowered = jax.jit(fn).lower(*fn_args)

    def lower(self, *fn_args):
        return self.lowered


def engine_fn(quantity: str, config: curvature.EngineConfig):
    """``(params, x, y, key) -> (value, grads, extras)`` of the engine under ``config``."""
    f = curvature.value_and_grad(apply, loss="cross_entropy", quantities=(quantity,), config=config)
    return lambda p, x, y, k: f(p, x, y, key=k)


def compare_variants(variants: list[str], outputs: dict, label: str = "") -> None:
    """Prints each variant's largest relative difference from the first one's outputs."""
    for v in variants[1:]:
        diff = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)),
            outputs[variants[0]],
            outputs[v],
        )
        print(label, v, "max rel diff vs", variants[0], max(jax.tree.leaves(diff)))


def time_and_print(fns: dict, repeats: int, label: str = "") -> None:
    """Times ``fns`` interleaved against ``"grad"`` and prints median, ratio and p25-p75."""
    print("load", os.getloadavg(), flush=True)
    res = benchmarking.time_interleaved(fns, baseline="grad", repeats=repeats, number=2)
    for name, t in res.items():
        lo, hi = np.percentile(t.samples, [25, 75]) * 1e3
        print(
            f"{label:22s} {name:14s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}  "
            f"p25-p75 {lo:.1f}-{hi:.1f}"
        )
    print("load", os.getloadavg(), flush=True)
