"""Every curvature quantity on models beyond Dense/Conv stacks, against brute force.

A small transformer block (embedding, LayerNorm, single-head self-attention, gelu MLP, residual
connections, cross-entropy at every position), a ResNet-style block (convolutions, a projected
skip connection, max and global average pooling) and an nnx model go through
``curvature.value_and_grad`` with every name of ``curvature.QUANTITIES`` in one call per model.
Each result is compared with an independent computation on the raveled parameters: per-sample
loops of ``jax.grad`` (first order), per-sample ``J^T H J`` from ``jax.jacrev`` of the model and
``jax.hessian`` of a loss written here (GGN diagonals, square roots), ``jax.hessian`` of the
per-sample loss (Hessian diagonals), and, for Monte Carlo quantities, the exact value they
estimate (many samples, loose tolerance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxopt_suite import curvature

TOL = dict(atol=1e-5, rtol=1e-5)
MC_SAMPLES = 4000
MC_TOL = 0.08  # relative to the largest entry of the exact value
# Compilation dominates these tests; XLA's backend optimisations halve it and change nothing
# that is checked here (float32 results within TOL).
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# --- models --------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Embedding, LayerNorm, single-head self-attention (fused q/k/v projection), a gelu MLP,
    two residual connections; logits at every position."""

    vocab: int = 5
    dim: int = 4
    hidden: int = 6

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.dim)(tokens)  # (N, T, d)
        q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(nn.LayerNorm()(h)), 3, axis=-1)
        weights = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(self.dim), axis=-1)
        h = h + nn.Dense(self.dim, name="attention_out")(jnp.einsum("nts,nsd->ntd", weights, v))
        h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(h)))
        return nn.Dense(self.vocab, name="logits")(h)


class ResidualBlock(nn.Module):
    """Conv - swish - Conv, plus a 1x1 projection of the input, then pooling and a Dense head."""

    channels: int = 3
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.swish(nn.Conv(self.channels, (3, 3), padding="SAME")(x))
        h = nn.Conv(self.channels, (3, 3), padding="SAME")(h)
        h = nn.swish(h + nn.Conv(self.channels, (1, 1), use_bias=False, name="skip")(x))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        return nn.Dense(self.classes)(jnp.mean(h, axis=(1, 2)))


class NnxNet(nnx.Module):
    """Linear - LayerNorm - tanh, a residual Linear, a Linear head (flax nnx)."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.mid = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.norm(self.inp(x)))
        h = h + jnp.tanh(self.mid(h))
        return self.head(h)


def _random_like(tree, seed):
    """numpy draws shaped like ``tree`` (flax's initialisers would cost compilations)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 2
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape), jnp.float32)

    return jax.tree.map(draw, tree)


class Case(NamedTuple):
    apply_fn: Callable
    params: Any
    inputs: jax.Array
    targets: jax.Array
    loss: str
    kernels: dict[str, str]  # layer name -> "dense" / "conv"
    layer_output: Callable  # (params, inputs, layer) -> the layer's output z (N, ..., out)
    perturbed: Callable | None  # (params, inputs, layer, eps) -> outputs with z + eps


def _linen_case(model, x, y, loss, kernels):
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed=0)

    def layer_output(p, inputs, layer):
        _, state = model.apply(
            {"params": p}, inputs, capture_intermediates=True, mutable=["intermediates"]
        )
        return state["intermediates"][layer]["__call__"][0]

    def perturbed(p, inputs, layer, eps):
        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            hit = context.module.name == layer and context.method_name == "__call__"
            return out + eps if hit else out

        with nn.intercept_methods(add):
            return model.apply({"params": p}, inputs)

    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    return Case(apply_fn, params, x, y, loss, kernels, layer_output, perturbed)


@functools.cache
def case(name):
    """One model with tiny inputs and targets."""
    if name == "transformer":
        tokens = jax.random.randint(jax.random.key(1), (2, 3), 0, 5)
        targets = jax.random.randint(jax.random.key(2), (2, 3), 0, 5)
        dense = ("qkv", "attention_out", "Dense_0", "Dense_1", "logits")
        kernels = dict.fromkeys(dense, "dense")
        return _linen_case(TransformerBlock(), tokens, targets, "cross_entropy", kernels)
    if name == "resnet":
        x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
        labels = jax.random.randint(jax.random.key(2), (2,), 0, 3)
        kernels = {"Conv_0": "conv", "Conv_1": "conv", "skip": "conv", "Dense_0": "dense"}
        return _linen_case(ResidualBlock(), x, labels, "cross_entropy", kernels)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    state = _random_like(state, seed=0)
    apply_fn = lambda s, inputs: nnx.merge(graphdef, s)(inputs)

    def layer_output(s, inputs, layer):
        net = nnx.merge(graphdef, s)
        h = jnp.tanh(net.norm(net.inp(inputs)))
        return {
            "inp": net.inp(inputs),
            "mid": net.mid(h),
            "head": net.head(h + jnp.tanh(net.mid(h))),
        }[layer]

    x = jax.random.normal(jax.random.key(1), (3, 3))
    y = jax.random.normal(jax.random.key(2), (3, 2))
    kernels = dict.fromkeys(("inp", "mid", "head"), "dense")
    # every nnx layer has a bias and no extra axes: G is the bias's GGN block
    return Case(apply_fn, state, x, y, "mse", kernels, layer_output, None)


MODELS = ("transformer", "resnet", "nnx")

# --- brute force ---------------------------------------------------------------------------


def _loss_one(loss, out, y):
    """One sample's loss, written independently of the engine (sum over positions/entries)."""
    if loss == "cross_entropy":
        logz = jax.scipy.special.logsumexp(out, axis=-1)
        return jnp.sum(logz - jnp.take_along_axis(out, y[..., None], axis=-1)[..., 0])
    return jnp.sum((out - y) ** 2)


def _mean_scale(loss, out_shape):
    """PyTorch's mean: over positions for cross-entropy, over all entries for MSE."""
    terms = np.prod(out_shape[:-1]) if loss == "cross_entropy" else np.prod(out_shape)
    return 1.0 / float(terms)


@functools.cache
def brute_force(name):
    """Per-sample gradients, GGN blocks J^T H J and Hessians on the raveled parameters."""
    apply_fn, params, x, y, loss = case(name)[:5]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, x, y):
        flat, unravel = ravel_pytree(params)
        c = _mean_scale(loss, apply_fn(params, x).shape)
        f_one = lambda v, xn: apply_fn(unravel(v), xn[None])[0]

        def sample(xy):
            xn, yn = xy
            ell = lambda v: c * _loss_one(loss, f_one(v, xn), yn)
            out = f_one(flat, xn)
            jac = jax.jacrev(f_one)(flat, xn).reshape(out.size, flat.size)
            h_out = jax.hessian(lambda o: c * _loss_one(loss, o.reshape(out.shape), yn))(
                out.reshape(-1)
            )
            return ell(flat), jax.grad(ell)(flat), jac.T @ h_out @ jac, jax.hessian(ell)(flat)

        return jax.lax.map(sample, (x, y))

    values, grads, ggn, hess = (np.asarray(a, np.float64) for a in run(params, x, y))
    return {"value": values.sum(), "grads": grads, "ggn": ggn, "hessian": hess}


def _leaf_index(params, layer, leaf="kernel"):
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return next(i for i, p in enumerate(paths) if p.startswith(f"['{layer}']['{leaf}']"))


@functools.cache
def kronecker_reference(name):
    """Per Dense/Conv layer ``(A, G)`` by brute force.

    A from the Jacobian of the layer output in its kernel (the output is linear in the kernel,
    so column 0 of output channel 0 is the layer input, or the unfolded patch, of every
    position), divided by N·T for Dense and by N for Conv. G from the GGN of the model output
    in a perturbation added to the layer output: a perturbation per position for Dense (G sums
    the positions' diagonal blocks), one broadcast over positions for Conv. ``G = None`` where
    the case has no perturbation (nnx): the bias's GGN block is G there.
    """
    cs = case(name)
    leaves, treedef = jax.tree.flatten(cs.params)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(leaves, x, y):
        params = jax.tree.unflatten(treedef, leaves)
        n = x.shape[0]
        c = _mean_scale(cs.loss, cs.apply_fn(params, x).shape)
        factors = {}
        for layer, kind in cs.kernels.items():
            idx = _leaf_index(params, layer)

            def z_of(w, idx=idx, layer=layer):
                swapped = list(leaves)
                swapped[idx] = w
                return cs.layer_output(jax.tree.unflatten(treedef, swapped), x, layer)

            w = leaves[idx]
            jac = jax.jacrev(z_of)(w)
            z_shape = jac.shape[: jac.ndim - w.ndim]
            patches = jac.reshape(*z_shape, -1, w.shape[-1])[..., 0, :, 0]
            rows = patches.reshape(-1, patches.shape[-1])
            a = rows.T @ rows / (rows.shape[0] if kind == "dense" else n)
            g = None
            if cs.perturbed is not None:
                eps_shape = z_shape[1:] if kind == "dense" else z_shape[-1:]

                def block(xy, layer=layer, kind=kind, eps_shape=eps_shape):
                    xn, yn = xy
                    lift = (lambda e: e[None]) if kind == "dense" else (lambda e: e)
                    f = lambda e: cs.perturbed(params, xn[None], layer, lift(e))[0]
                    zero = jnp.zeros(eps_shape)
                    out = f(zero)
                    j = jax.jacrev(f)(zero).reshape(out.size, -1)
                    h = jax.hessian(lambda o: c * _loss_one(cs.loss, o.reshape(out.shape), yn))(
                        out.reshape(-1)
                    )
                    return j.T @ h @ j

                m = jax.lax.map(block, (x, y)).sum(0)
                d = eps_shape[-1]
                t = m.shape[0] // d
                g = jnp.einsum("tatb->ab", m.reshape(t, d, t, d))
            factors[layer] = (a, g)
        return factors

    found = run(leaves, cs.inputs, cs.targets)
    return {
        k: tuple(None if v is None else np.asarray(v, np.float64) for v in f)
        for k, f in found.items()
    }


def _kron(mc):
    def check(got, ref, params, name):
        given = jax.tree.structure(params).flatten_up_to(got)
        ggn = ref["ggn"].sum(0)
        blocks = [ggn[w, w] for w in _leaf_slices(params)]
        expected: list = [
            (blocks[i],) if leaf.ndim == 1 else None
            for i, leaf in enumerate(jax.tree.leaves(params))
        ]
        for layer, (a, g) in kronecker_reference(name).items():
            if g is None:
                g = blocks[_leaf_index(params, layer, "bias")]
            expected[_leaf_index(params, layer)] = (a, g)
        for i, (f, want) in enumerate(zip(given, expected, strict=True)):
            if want is None:
                assert f is None, (i, f)
                continue
            assert isinstance(f, tuple) and len(f) == len(want), (i, f)
            for k, (u, v) in enumerate(zip(f, want, strict=True)):
                u = np.asarray(u, np.float64)
                assert u.shape == v.shape, (i, k, u.shape, v.shape)
                exact_part = len(want) == 2 and k == 0  # A has no Monte Carlo
                (_close if exact_part or not mc else _close_mc)(u, v, f"leaf {i} factor {k}")

    return check


def _flat(tree, lead=0):
    """Ravel a params-shaped tree whose leaves carry ``lead`` leading axes: (*lead, P)."""
    leaves = jax.tree.leaves(tree)
    shape = leaves[0].shape[:lead]
    return np.concatenate([np.asarray(a, np.float64).reshape(*shape, -1) for a in leaves], axis=-1)


def _close(got, want, what):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL)


def _close_mc(got, want, what):
    scale = np.abs(want).max() + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=MC_TOL, err_msg=what)


def _square_root_blocks(columns):
    """Σ_k V_k V_kᵀ per sample from V (K, N, P)."""
    return np.einsum("knp,knq->npq", columns, columns)


def _leaf_slices(params):
    """Where each leaf sits in the raveled parameters (ravel_pytree's leaf order)."""
    sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(params)]
    ends = np.cumsum(sizes)
    return [slice(e - s, e) for s, e in zip(sizes, ends, strict=True)]


# quantity -> check(extras[quantity], brute-force dict, params)
def _first_order(quantity):
    def check(got, ref, params, name):
        g = ref["grads"]  # (N, P): c ∇ℓ_n
        n = g.shape[0]
        if quantity == "batch_l2":
            for a, where in zip(jax.tree.leaves(got), _leaf_slices(params), strict=True):
                _close(np.asarray(a), (g[:, where] ** 2).sum(1), quantity)
            return
        want = {
            "grad_batch": g,
            "sum_grad_squared": (g**2).sum(0),
            "variance": (g**2).sum(0) / n - (g.sum(0) / n) ** 2,
        }[quantity]
        _close(_flat(got, lead=1 if quantity == "grad_batch" else 0), want, quantity)

    return check


def _diag(matrix_name, batch, mc=False):
    def check(got, ref, params, name):
        d = np.diagonal(ref[matrix_name], axis1=1, axis2=2)  # (N, P)
        want = d if batch else d.sum(0)
        (_close_mc if mc else _close)(_flat(got, lead=1 if batch else 0), want, matrix_name)

    return check


def _sqrt_ggn(mc):
    def check(got, ref, params, name):
        columns = _flat(got, lead=2)  # (K, N, P)
        n, p = ref["ggn"].shape[:2]
        assert columns.shape[1:] == (n, p), columns.shape
        (_close_mc if mc else _close)(_square_root_blocks(columns), ref["ggn"], "V Vᵀ")

    return check


CHECKS = {
    "grad_batch": _first_order("grad_batch"),
    "batch_l2": _first_order("batch_l2"),
    "sum_grad_squared": _first_order("sum_grad_squared"),
    "variance": _first_order("variance"),
    "diag_ggn_exact": _diag("ggn", batch=False),
    "diag_ggn_exact_batch": _diag("ggn", batch=True),
    "diag_ggn_mc": _diag("ggn", batch=False, mc=True),
    "diag_ggn_mc_batch": _diag("ggn", batch=True, mc=True),
    "diag_h": _diag("hessian", batch=False),
    "diag_h_batch": _diag("hessian", batch=True),
    "sqrt_ggn_exact": _sqrt_ggn(mc=False),
    "sqrt_ggn_mc": _sqrt_ggn(mc=True),
    "kflr": _kron(mc=False),
    "kfac": _kron(mc=True),
}

# (model, quantity) pairs the engine refuses, with the words its error must contain
# (KFRA backpropagates one batch-averaged Hessian through a chain of Dense layers on (N, d)
# inputs: attention, convolutions and residual connections are outside it, as in BackPACK)
UNSUPPORTED: dict[tuple[str, str], str] = {(m, "kfra"): "kfra needs" for m in MODELS}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_quantity_against_brute_force(name):
    apply_fn, params, x, y, loss = case(name)[:5]
    names = tuple(curvature.QUANTITIES)
    unchecked = [q for q in names if q not in CHECKS and (name, q) not in UNSUPPORTED]
    assert not unchecked, f"no brute-force check for the engine's new quantities {unchecked}"
    refused = tuple(q for q in names if (name, q) in UNSUPPORTED)
    for q in refused:
        fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=(q,))
        with pytest.raises((ValueError, NotImplementedError), match=UNSUPPORTED[name, q]):
            jax.eval_shape(lambda p, q_fn=fn: q_fn(p, x, y, key=jax.random.key(0)), params)
    wanted = tuple(q for q in names if q not in refused)
    fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=wanted, mc_samples=MC_SAMPLES)
    value, grads, extras = jax.jit(fn, compiler_options=FAST_COMPILE)(
        params, x, y, key=jax.random.key(3)
    )
    ref = brute_force(name)
    _close(float(value), ref["value"], "value")
    _close(_flat(grads), ref["grads"].sum(0), "grads")
    for q in wanted:
        CHECKS[q](extras[q], ref, params, name)
