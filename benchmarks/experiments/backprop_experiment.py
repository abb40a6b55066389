"""Session 4's first experiment (the table in notes.md): the CNN's column backpropagation
pieces for 10 columns x 64 samples, plain vs alternative formulations, and the engine.

Run from the repository root, under the benchmark lock:
``flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/backprop_experiment.py
[all|conv|pool|engine]`` (``R=9`` sets the repeats).
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_suite import benchmarking, curvature, zoo
from jaxopt_suite.curvature import fastgrad
from jaxopt_suite.curvature.layers import ConvConfig

K, N = 10, 64
key = jax.random.key(0)
ks = jax.random.split(key, 8)
W1 = jax.random.normal(ks[0], (5, 5, 20, 50)) * 0.05
x1 = jax.random.normal(ks[1], (K * N, 12, 12, 20))
ct1 = jax.random.normal(ks[2], (K, N, 8, 8, 50))
DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)


def vjp_batched(ct, w):
    _, f = jax.vjp(lambda x: conv(x, w), jnp.zeros((K * N, 12, 12, 20)))
    return f(ct.reshape(K * N, 8, 8, 50))[0]


def vjp_separate(ct, w):
    outs = []
    for k in range(K):
        _, f = jax.vjp(lambda x: conv(x, w), jnp.zeros((N, 12, 12, 20)))
        outs.append(f(ct[k])[0])
    return jnp.stack(outs)


def im2col_fold(ct, w):
    c = ct.reshape(-1, 50)
    y = c @ w.reshape(25 * 20, 50).T  # (KN*64, 500)
    y = y.reshape(K * N, 8, 8, 5, 5, 20)
    out = jnp.zeros((K * N, 12, 12, 20))
    for a in range(5):
        for b in range(5):
            out = out + jnp.pad(y[:, :, :, a, b], ((0, 0), (a, 4 - a), (b, 4 - b), (0, 0)))
    return out


def im2col_fold_sliceadd(ct, w):
    c = ct.reshape(-1, 50)
    y = c @ w.reshape(25 * 20, 50).T
    y = y.reshape(K * N, 8, 8, 5, 5, 20)
    out = jnp.zeros((K * N, 12, 12, 20))
    for a in range(5):
        for b in range(5):
            out = out.at[:, a : a + 8, b : b + 8].add(y[:, :, :, a, b])
    return out


def flipped_conv(ct, w):
    wf = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # (5,5,50,20)
    return lax.conv_general_dilated(
        ct.reshape(K * N, 8, 8, 50), wf, (1, 1), ((4, 4), (4, 4)), dimension_numbers=DN
    )


# pooling
xp0 = jax.nn.relu(jax.random.normal(ks[3], (N, 24, 24, 20)))
ctp0 = jax.random.normal(ks[4], (K, N, 12, 12, 20))
xp1 = jax.nn.relu(jax.random.normal(ks[5], (N, 8, 8, 50)))
ctp1 = jax.random.normal(ks[6], (K, N, 4, 4, 50))


def pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def pool_vjp_sep(x, ct):
    _, f = jax.vjp(pool, x)
    return jnp.stack([f(ct[k])[0] for k in range(ct.shape[0])])


def pool_vjp_vmap(x, ct):
    _, f = jax.vjp(pool, x)
    return jax.vmap(lambda c: f(c)[0])(ct)


def first_max_mask(x):
    n, h, w, c = x.shape
    xr = x.reshape(n, h // 2, 2, w // 2, 2, c)
    m = jnp.max(xr, axis=(2, 4), keepdims=True)
    eq = [xr[:, :, i : i + 1, :, j : j + 1] == m for i in range(2) for j in range(2)]
    taken = jnp.zeros_like(eq[0])
    parts = []
    for e in eq:
        sel = e & ~taken
        taken = taken | e
        parts.append(sel)
    mask = jnp.concatenate(
        [jnp.concatenate(parts[0:2], axis=4), jnp.concatenate(parts[2:4], axis=4)], axis=2
    )
    return mask.astype(x.dtype)  # (n, h/2, 2, w/2, 2, c)


CONFIG = ConvConfig((5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1)


def banded(ct, w):  # the engine's formulation (curvature.fastgrad)
    return fastgrad.conv_input_cotangent(
        ct.reshape(K * N, 8, 8, 50), w, CONFIG, (K * N, 12, 12, 20)
    )


def pool_fastgrad(x, ct):  # the engine's mask backward, one call per column
    with fastgrad.patched_pooling():
        _, f = jax.vjp(pool, x)
    return jnp.stack([f(ct[k])[0] for k in range(ct.shape[0])])


def pool_mask(x, ct):
    mask = first_max_mask(x)
    k, n, h2, w2, c = ct.shape
    out = mask[None] * ct[:, :, :, None, :, None, :]
    return out.reshape(k, n, h2 * 2, w2 * 2, c)


# correctness
r = vjp_batched(ct1, W1)
for f in (im2col_fold, im2col_fold_sliceadd, flipped_conv, banded):
    print(f.__name__, float(jnp.max(jnp.abs(jax.jit(f)(ct1, W1) - r))))
print("pool0", float(jnp.max(jnp.abs(pool_mask(xp0, ctp0) - pool_vjp_sep(xp0, ctp0)))))
print("pool1", float(jnp.max(jnp.abs(pool_mask(xp1, ctp1) - pool_vjp_sep(xp1, ctp1)))))

model = zoo.make_model("backpack-cnn")
X = jax.random.normal(ks[7], (N, 28, 28, 1))
Y = jnp.arange(N) % 10
params = zoo.init_params(model, key)
apply = lambda p, x: model.apply({"params": p}, x)


def loss(p, x, y):
    return -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(N), y])


grad = jax.jit(jax.grad(loss))
exact = jax.jit(
    curvature.value_and_grad(apply, loss="cross_entropy", quantities=("diag_ggn_exact",))
)
mc = jax.jit(
    lambda p, x, y, k: curvature.value_and_grad(
        apply, loss="cross_entropy", quantities=("diag_ggn_mc",)
    )(p, x, y, key=k)
)

which = sys.argv[1] if len(sys.argv) > 1 else "all"
fns = {"grad": (grad, (params, X, Y))}
if which in ("all", "conv"):
    fns.update(
        {
            "conv_vjp_batched": (jax.jit(vjp_batched), (ct1, W1)),
            "conv_vjp_separate": (jax.jit(vjp_separate), (ct1, W1)),
            "im2col_fold": (jax.jit(im2col_fold), (ct1, W1)),
            "im2col_fold_at": (jax.jit(im2col_fold_sliceadd), (ct1, W1)),
            "flipped_conv": (jax.jit(flipped_conv), (ct1, W1)),
            "banded_fastgrad": (jax.jit(banded), (ct1, W1)),
        }
    )
if which in ("all", "pool"):
    fns.update(
        {
            "pool0_vjp_sep": (jax.jit(pool_vjp_sep), (xp0, ctp0)),
            "pool0_vjp_vmap": (jax.jit(pool_vjp_vmap), (xp0, ctp0)),
            "pool0_mask": (jax.jit(pool_mask), (xp0, ctp0)),
            "pool1_vjp_sep": (jax.jit(pool_vjp_sep), (xp1, ctp1)),
            "pool1_mask": (jax.jit(pool_mask), (xp1, ctp1)),
            "pool0_fastgrad": (jax.jit(pool_fastgrad), (xp0, ctp0)),
            "pool1_fastgrad": (jax.jit(pool_fastgrad), (xp1, ctp1)),
        }
    )
if which in ("all", "engine"):
    fns.update(
        {"diag_ggn_exact": (exact, (params, X, Y)), "diag_ggn_mc": (mc, (params, X, Y, key))}
    )
print("load", os.getloadavg())
res = benchmarking.time_interleaved(
    fns, baseline="grad", repeats=int(os.environ.get("R", 7)), number=2
)
for k, t in res.items():
    print(f"{k:22s} {t.median * 1e3:8.2f} ms  x{t.ratio:.2f}")
