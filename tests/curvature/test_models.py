"""Every curvature quantity on models beyond Dense/Conv stacks, against brute force.

A small transformer block (embedding, LayerNorm, single-head self-attention, gelu MLP, residual
connections, cross-entropy at every position), a ResNet-style block (convolutions, a projected
skip connection, max and global average pooling) and an nnx model go through
``curvature.value_and_grad`` with every name of ``curvature.QUANTITIES`` in one call per model.
Each result is compared with an independent computation on the raveled parameters
(tests/reference.py; the Kronecker factors' here): per-sample loops of ``jax.grad`` (first
order), per-sample ``J^T H J`` from ``jax.jacrev`` of the model and ``jax.hessian`` of a loss
written independently of the engine (GGN diagonals, square roots), ``jax.hessian`` of the
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

from jaxopt_suite import curvature
from tests import reference
from tests.reference import random_like

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
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = random_like(shapes, seed=0, vector_fan_in=2, dtype=jnp.float32)

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
    state = random_like(state, seed=0, vector_fan_in=2, dtype=jnp.float32)
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


@functools.cache
def brute_force(name):
    """Every exact quantity of ``case(name)`` by brute force (tests/reference.py), with the
    per-sample GGN blocks J^T H J and Hessian diagonals."""
    apply_fn, params, x, y, loss = case(name)[:5]
    return reference.quantities(apply_fn, params, x, y, loss, full_ggn=True, hessian=True)


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
        c = 1.0 / reference.normaliser(cs.loss, cs.apply_fn(params, x).shape)
        one = reference.per_sample_loss(cs.loss)
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
                    h = jax.hessian(lambda o: c * one(o.reshape(out.shape), yn))(out.reshape(-1))
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
        blocks = jax.tree.leaves(ref["ggn_blocks"])
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


def _close(got, want, what):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL)


def _close_mc(got, want, what):
    scale = np.abs(want).max() + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=MC_TOL, err_msg=what)


# quantity -> check(extras[quantity], brute-force dict of reference.quantities, params, name)
def _first_order(quantity):
    def check(got, ref, params, name):
        lead = 1 if quantity in ("grad_batch", "batch_l2") else 0
        _close(reference.flat(got, lead), reference.flat(ref[quantity], lead), quantity)

    return check


def _diag(exact, mc=False):
    def check(got, ref, params, name):
        lead = 1 if exact.endswith("_batch") else 0
        (_close_mc if mc else _close)(
            reference.flat(got, lead), reference.flat(ref[exact], lead), exact
        )

    return check


def _sqrt_ggn(mc):
    def check(got, ref, params, name):
        columns = reference.flat(got, lead=2)  # (K, N, P)
        n, p = ref["ggn_batch"].shape[:2]
        assert columns.shape[1:] == (n, p), columns.shape
        gram = reference.square_root_gram(columns)
        (_close_mc if mc else _close)(gram, ref["ggn_batch"], "V Vᵀ")

    return check


CHECKS = {
    "grad_batch": _first_order("grad_batch"),
    "batch_l2": _first_order("batch_l2"),
    "sum_grad_squared": _first_order("sum_grad_squared"),
    "variance": _first_order("variance"),
    "diag_ggn_exact": _diag("diag_ggn_exact"),
    "diag_ggn_exact_batch": _diag("diag_ggn_exact_batch"),
    "diag_ggn_mc": _diag("diag_ggn_exact", mc=True),
    "diag_ggn_mc_batch": _diag("diag_ggn_exact_batch", mc=True),
    "diag_h": _diag("diag_h"),
    "diag_h_batch": _diag("diag_h_batch"),
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
    _close(reference.flat(grads), reference.flat(ref["grad"]), "grads")
    for q in wanted:
        CHECKS[q](extras[q], ref, params, name)
