"""One side of ``ab_commits``: times the A/B workloads of the jaxopt_suite found on sys.path.

Run by ``ab_commits.py`` with the tree under test first on ``PYTHONPATH``; reads one JSON
command per line on stdin and answers one JSON line on stdout, so that two workers (two
commits) can be timed alternately while the other waits. Uses only names that exist in both
layouts (before and after the harness moved), falling back where a name moved.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import curvature, fwdgrad, train, zoo


def _value_fn_gradient():
    """``value_fn_gradient`` from the harness (after the refactor) or from fwdgrad (before)."""
    try:
        from jaxopt_suite.harness import train as harness_train

        return harness_train.value_fn_gradient
    except ImportError:
        return fwdgrad.value_fn_gradient


def _images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    return images, labels


def _curvature(model_name: str, n: int, quantity: str):
    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    images, labels = _images(n)
    x = images.astype(jnp.float32)[..., None] / 255.0
    fn = curvature.value_and_grad(
        lambda p, x: model.apply({"params": p}, x), loss="cross_entropy", quantities=(quantity,)
    )
    return jax.jit(lambda p, x, y: fn(p, x, y)), (params, x, labels)


def _step(model, tx, gradient, n: int):
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = zoo.init_params(model, jax.random.key(0))
    state = train.init_state(params, tx, jax.random.key(2))
    step = jax.jit(train.make_step(problem, tx, gradient))
    return step, (state, *_images(n))


def _fwdgrad_step(n: int):
    tx = optax.chain(fwdgrad.forward_gradient(jax.random.key(1)), optax.sgd(1e-3))
    return _step(zoo.make_model("mlp"), tx, _value_fn_gradient(), n)


def _proxprop_step(n: int):
    import functools

    from jaxopt_suite.proxprop import ProxPropDense

    dense = functools.partial(ProxPropDense, tau_prox=0.05, optimization_mode="prox_cg1")
    model = zoo.MLP(hidden=(1000, 1000), dense=dense)
    tx = optax.sgd(1.0, momentum=0.95, nesterov=True)
    return _step(model, tx, train.backprop, n)


WORKLOADS = {
    "cnn diag_ggn_exact (N=64)": lambda: _curvature("backpack-cnn", 64, "diag_ggn_exact"),
    "mlp batch_l2 (N=128)": lambda: _curvature("mlp", 128, "batch_l2"),
    "fwdgrad step, mlp (N=64)": lambda: _fwdgrad_step(64),
    "proxprop prox_cg1 step, mlp 1000-1000 (N=500)": lambda: _proxprop_step(500),
}


def _program_digest(text: str) -> str:
    """A digest of the lowered program without its source locations (which name files and
    lines, and so differ between layouts even when the computation is the same)."""
    text = re.sub(r"loc\(.*?\)", "", text)
    kept = [line for line in text.splitlines() if not line.strip().startswith("#loc")]
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()


def _block(out) -> None:
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def main() -> None:
    compiled = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["workload"]
        if cmd["cmd"] == "setup":
            fn, args = WORKLOADS[name]()
            lowered = fn.lower(*args)
            exe = lowered.compile()
            mem = exe.memory_analysis()
            compiled[name] = (exe, args)
            reply = {
                "temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
                "program": _program_digest(lowered.as_text()),
            }
        else:
            exe, args = compiled[name]
            start = time.perf_counter()
            for _ in range(cmd["number"]):
                out = exe(*args)
                _block(out)
                del out
            reply = {"seconds": (time.perf_counter() - start) / cmd["number"]}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
