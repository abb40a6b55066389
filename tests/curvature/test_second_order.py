"""The second-part quantities of curvature.value_and_grad against brute force: GGN blocks from
jax.jacrev and jax.hessian of an independently written loss and Hessian diagonals from
jax.hessian (tests/reference.py), Kronecker factors from hand-written layer inputs and
Jacobians."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_suite import curvature, kronecker
from jaxopt_suite.curvature import hessian, kron
from tests import reference
from tests.reference import cross_entropy_one as ce_one

TOL = dict(atol=1e-5, rtol=1e-5)
# Compilation dominates these tests: XLA's backend optimisations roughly double it and change
# nothing checked here.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
SECOND = ("sqrt_ggn_exact", "kflr", "kfra", "diag_h", "diag_h_batch", "diag_ggn_exact")


def act(z):  # smooth activations side by side, with a product of two of them
    return jnp.tanh(z) + nn.gelu(z) + nn.softplus(z) * nn.sigmoid(z)


class MLP(nn.Module):
    activation: object = act

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)  # constructed first: Dense_0
        return nn.Dense(3)(self.activation(h))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(2, (2, 2), strides=(2, 1), padding="SAME")(x))
        h = nn.avg_pool(nn.sigmoid(h), (1, 2))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class Norm(nn.Module):
    """A LayerNorm (uncovered: generic residual path) between two Dense layers."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(4)(x))
        return nn.Dense(3)(jnp.tanh(h))


class Bilinear(nn.Module):
    """A product of two parameter-dependent matrices: the exact generic fallback."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x).reshape(x.shape[0], 2, 2)
        return nn.Dense(3)((h @ h).reshape(x.shape[0], 4))


class Chain(nn.Module):
    """Dense layers joined by a per-sample map that is not elementwise (softmax over features):
    KFRA's full per-sample Jacobian branch."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.softmax(nn.Dense(3)(x))
        h = jnp.tanh(nn.Dense(4)(h))
        return nn.Dense(3)(h)


def piecewise_linear(z):  # zero second derivative almost everywhere
    return (
        nn.relu(z)
        + jnp.abs(z)
        + jnp.where(z > 0.3, z, 0.5 * z)
        + jnp.clip(z, -1.0, 1.0)
        - jnp.maximum(z, 0.2)
    )


class Skip(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(3)(x))
        return nn.Dense(3)(h) + h


def setup(model, shape, n, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), (n, *shape))
    y = jax.random.randint(jax.random.key(seed + 2), (n,), 0, 3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = reference.random_like(shapes, seed, std=0.7, dtype=jnp.float32)
    return (lambda p, x: model.apply({"params": p}, x)), params, x, y


def brute(apply, params, x, y):
    """Brute force for the mean cross-entropy: GGN (blocks) and Hessian diagonals, per sample
    and summed (tests/reference.py)."""
    return reference.quantities(apply, params, x, y, "cross_entropy", full_ggn=True, hessian=True)


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


def check_diagonals(extras, ref):
    for name in ("diag_h", "diag_h_batch"):
        for got, want in zip(
            jax.tree.leaves(extras[name]), jax.tree.leaves(ref[name]), strict=True
        ):
            close(got, want)


def run(apply, params, x, y, quantities, **kw):
    fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=quantities, **kw)
    return fast_jit(fn)(params, x, y, key=kw.pop("key", None))[2]


# --- the MLP: every new quantity, structured and generic -------------------------------------


@pytest.mark.slow
def test_mlp_every_new_quantity_both_paths():
    apply, params, x, y = setup(MLP(), (2,), 3)
    # tanh, gelu's tanh, x^3 and x * tanh(.), softplus's exp and log1p, the sigmoids, and the
    # product softplus * sigmoid: diag_h from the elementwise mechanism, not the fallback
    assert len(hessian.instrument(apply, (True, False), params, x).sites) >= 8
    ref = brute(apply, params, x, y)
    ggn_blocks = ref["ggn_blocks"]
    n = x.shape[0]

    @fast_jit
    def by_hand(params, x, y):
        w1, b1 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
        w2 = params["Dense_1"]["kernel"]
        z1 = x @ w1 + b1
        h = act(z1)
        out = h @ w2 + params["Dense_1"]["bias"]
        h_out = jax.vmap(jax.hessian(ce_one))(out, y) / n
        d1 = jax.vmap(jax.vmap(jax.grad(act)))(z1)  # (N, 4): the activation's derivative
        # KFLR: G_l = sum_n J_n^T (c H_n) J_n with J_n = d out / d z_l.
        g2 = h_out.sum(0)
        g1 = jnp.einsum("ni,ia,nab,jb,nj->ij", d1, w2, h_out, w2, d1)
        # KFRA: the batch-averaged Hessian backpropagated through W2 and the activation.
        g1_kfra = (w2 @ g2 @ w2.T) * (d1.T @ d1) / n
        return x.T @ x / n, h.T @ h / n, g1, g2, g1_kfra

    a1, a2, g1, g2, g1_kfra = by_hand(params, x, y)
    _, _, mlp_factors = fast_jit(
        lambda p, x, y: kronecker.mlp_value_grad_and_factors(p, x, y, activation=act)
    )(params, x, y)

    for structured in (True, False):
        extras = run(apply, params, x, y, SECOND, structured=structured)
        check_diagonals(extras, ref)
        for v, block in zip(
            jax.tree.leaves(extras["sqrt_ggn_exact"]), jax.tree.leaves(ggn_blocks), strict=True
        ):
            assert v.shape[:2] == (3, n)
            close(reference.square_root_gram(v.reshape(3, n, -1), per_sample=False), block)
        kflr = extras["kflr"]
        close(kflr["Dense_0"]["bias"][0], ggn_blocks["Dense_0"]["bias"])
        close(kflr["Dense_1"]["bias"][0], ggn_blocks["Dense_1"]["bias"])
        if not structured:  # kernels have no rule on the generic path
            assert kflr["Dense_0"]["kernel"] is None and extras["kfra"]["Dense_0"]["bias"] is None
            continue
        close(kflr["Dense_0"]["kernel"][0], a1)
        close(kflr["Dense_1"]["kernel"][0], a2)
        close(kflr["Dense_0"]["kernel"][1], g1)
        close(kflr["Dense_1"]["kernel"][1], g2)
        for name in ("Dense_0", "Dense_1"):
            for got, want in zip(kflr[name]["kernel"], mlp_factors[name]["kernel"], strict=True):
                close(got, want)
        kfra = extras["kfra"]
        close(kfra["Dense_0"]["kernel"][0], a1)
        close(kfra["Dense_1"]["kernel"][1], g2)
        close(kfra["Dense_0"]["kernel"][1], g1_kfra)
        close(kfra["Dense_0"]["bias"][0], g1_kfra)


def test_batch_of_one_kronecker_product_is_the_exact_ggn_block():
    apply, params, x, y = setup(MLP(), (2,), 1, seed=3)
    want = reference.ggn_blocks(apply, params, x, y, "cross_entropy")
    extras = run(apply, params, x, y, ("kflr", "kfra"))
    for q in ("kflr", "kfra"):
        for name in ("Dense_0", "Dense_1"):
            a, g = extras[q][name]["kernel"]
            close(jnp.kron(a, g), want[name]["kernel"])


def test_kfac_and_sqrt_ggn_mc_converge_to_exact():
    apply, params, x, y = setup(MLP(activation=jnp.tanh), (2,), 2, seed=4)
    fn = curvature.value_and_grad(
        apply,
        loss="cross_entropy",
        quantities=("kfac", "kflr", "sqrt_ggn_mc", "diag_ggn_exact"),
        mc_samples=3000,
    )
    extras = fast_jit(fn)(params, x, y, key=jax.random.key(0))[2]
    for mc, exact in zip(
        jax.tree.leaves(extras["kfac"]), jax.tree.leaves(extras["kflr"]), strict=True
    ):
        close(mc, exact, atol=0.06 * float(jnp.abs(exact).max()), rtol=0)
    for v, d in zip(
        jax.tree.leaves(extras["sqrt_ggn_mc"]),
        jax.tree.leaves(extras["diag_ggn_exact"]),
        strict=True,
    ):
        assert v.shape[:2] == (3000, 2)
        close((v**2).sum((0, 1)), d, atol=0.06 * float(jnp.abs(d).max()), rtol=0)


# --- convolutions --------------------------------------------------------------------------


def test_conv_factors_backpack_convention_and_diag_h():
    apply, params, x, y = setup(CNN(), (3, 4, 2), 2, seed=5)
    assert len(hessian.instrument(apply, (True, False), params, x).sites) == 2
    ref = brute(apply, params, x, y)
    extras = run(apply, params, x, y, ("kflr", "diag_h", "diag_h_batch", "sqrt_ggn_exact"))
    check_diagonals(extras, ref)
    ggn_blocks = ref["ggn_blocks"]
    # A: patches under each output position (kernel row-major (kh, kw, c_in)), by hand; SAME
    # padding for a 2x2 kernel pads 0 before and 1 after; stride (2, 1).
    xp = np.pad(np.asarray(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
    patches = [
        xp[n, i : i + 2, j : j + 2, :].reshape(-1)
        for n in range(2)
        for i in range(0, 3, 2)
        for j in range(4)
    ]
    patches = np.stack(patches)
    a, g = extras["kflr"]["Conv_0"]["kernel"]
    close(a, patches.T @ patches / 2)
    close(g, ggn_blocks["Conv_0"]["bias"])
    close(extras["kflr"]["Conv_0"]["bias"][0], ggn_blocks["Conv_0"]["bias"])
    v = extras["sqrt_ggn_exact"]["Conv_0"]["kernel"]
    gram = reference.square_root_gram(v.reshape(*v.shape[:2], 2 * 2 * 2 * 2), per_sample=False)
    close(gram, ggn_blocks["Conv_0"]["kernel"])


# --- the Hessian diagonal beyond the elementwise mechanism -----------------------------------


@pytest.mark.parametrize("model", [Norm(), Bilinear()])
def test_diag_h_layernorm_and_generic_fallback(model):
    apply, params, x, y = setup(model, (3,), 3, seed=6)
    if isinstance(model, Norm):  # the elementwise mechanism covers LayerNorm (no fallback)
        assert hessian.instrument(apply, (True, False), params, x).sites
    else:
        with pytest.raises(hessian.Unsupported, match="dot_general"):
            hessian.instrument(apply, (True, False), params, x)
    ref = reference.quantities(apply, params, x, y, "cross_entropy", hessian=True)
    check_diagonals(run(apply, params, x, y, ("diag_h", "diag_h_batch")), ref)


def test_diag_h_of_a_relu_network_is_the_ggn_diagonal():
    # diag_ggn_exact itself is checked against brute force in test_curvature.py
    apply, params, x, y = setup(MLP(activation=piecewise_linear), (3,), 3, seed=6)
    # relu, abs, where-selects, clip and max with a constant are no residual sites: diag_h
    # backpropagates the GGN's columns and nothing else
    assert hessian.instrument(apply, (True, False), params, x).sites == []
    extras = run(
        apply, params, x, y, ("diag_h", "diag_h_batch", "diag_ggn_exact", "diag_ggn_exact_batch")
    )
    for a, b in zip(
        jax.tree.leaves((extras["diag_h"], extras["diag_h_batch"])),
        jax.tree.leaves((extras["diag_ggn_exact"], extras["diag_ggn_exact_batch"])),
        strict=True,
    ):
        close(a, b)


# --- bfloat16 and errors -------------------------------------------------------------------


def test_bfloat16_extras_in_leaf_dtype():
    apply, params, x, y = setup(MLP(activation=jnp.tanh), (2,), 3, seed=7)
    quantities = ("sqrt_ggn_exact", "kflr", "diag_h", "diag_ggn_exact")
    want = run(apply, params, x, y, quantities)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, x))
    got = run(apply, *low, y, quantities)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.abs(b).max())
        close(np.asarray(a, np.float32), b, atol=0.05 * scale, rtol=0.05)


def test_kfra_outside_a_chain_raises():
    apply, params, x, y = setup(Skip(), (3,), 2)
    with pytest.raises(ValueError, match="kfra needs"):
        run(apply, params, x, y, ("kfra",))
    with pytest.raises(ValueError, match=r"valid names: .*kfra.*diag_h_batch"):
        curvature.value_and_grad(apply, loss="mse", quantities=("kfr",))


# --- KFRA beyond elementwise activations, and the blocked symmetric product -------------------


def test_kfra_through_a_non_elementwise_map():
    apply, params, x, y = setup(Chain(), (2,), 2, seed=8)
    n = x.shape[0]
    got = run(apply, params, x, y, ("kfra",))["kfra"]

    @fast_jit
    def by_hand(params, x, y):
        w = [params[f"Dense_{i}"]["kernel"] for i in range(3)]
        b = [params[f"Dense_{i}"]["bias"] for i in range(3)]
        z0 = x @ w[0] + b[0]
        z1 = jax.nn.softmax(z0) @ w[1] + b[1]
        out = jnp.tanh(z1) @ w[2] + b[2]
        g2 = jax.vmap(jax.hessian(ce_one))(out, y).sum(0) / n
        # per-sample Jacobians of the maps between layers, by autodiff
        j1 = jax.vmap(jax.jacrev(jnp.tanh))(z1)  # (N, 4, 4)
        j0 = jax.vmap(jax.jacrev(jax.nn.softmax))(z0)  # (N, 3, 3)
        g1 = jnp.einsum("nai,ab,nbj->ij", j1, w[2] @ g2 @ w[2].T, j1) / n
        g0 = jnp.einsum("nai,ab,nbj->ij", j0, w[1] @ g1 @ w[1].T, j0) / n
        return g0, g1, g2

    for name, g in zip(("Dense_0", "Dense_1", "Dense_2"), by_hand(params, x, y), strict=True):
        close(got[name]["kernel"][1], g)
        close(got[name]["bias"][0], g)


def test_symmetric_dot_in_blocks():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(7, 10))
    k, m = rng.normal(size=(10, 6)), rng.normal(size=(6, 6))
    m = m + m.T
    cases = (
        (a, a, a.T @ a),  # a Gram matrix
        ((k @ m).T, k.T, k @ m @ k.T),  # K M Kᵀ for a symmetric M
    )
    both = fast_jit(lambda pairs: [kron.symmetric_dot(lhs, rhs, 3) for lhs, rhs in pairs])
    found = both(
        [(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)) for lhs, rhs, _ in cases]
    )
    for got, (_, _, want) in zip(found, cases, strict=True):
        close(got, want)
        # blocks below the diagonal are the transposed ones above it
        np.testing.assert_array_equal(np.asarray(got)[3:, :3], np.asarray(got)[:3, 3:].T)
    with pytest.raises(ValueError, match="one shape"):
        kron.symmetric_dot(jnp.ones((3, 4)), jnp.ones((4, 3)))
