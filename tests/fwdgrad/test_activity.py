"""Activity-perturbed forward gradients and local losses: the estimates against ``jax.grad``
(unbiasedness over many keys), their variance against the docstring's formula evaluated by
brute force (``jax.jacfwd`` of each layer's own map, ``jax.grad`` with respect to an explicit
perturbation of the pre-activations), and the step's jaxpr against any backward pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import fwdgrad, train

LOSS = optax.softmax_cross_entropy_with_integer_labels
WIDTHS = (5, 4, 3)
X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
Y = jnp.arange(6) % 3


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(WIDTHS[0])(x))
        x = nn.tanh(nn.Dense(WIDTHS[1])(x))
        return nn.Dense(WIDTHS[2])(x)


MODEL = TinyMLP()
PARAMS = MODEL.init(jax.random.key(1), X)


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def mean_loss(params):
    return LOSS(MODEL.apply(params, X), Y).mean()


def sample_estimates(estimator, num_keys, *args):
    keys = jax.random.split(jax.random.key(7), num_keys)
    return jax.jit(jax.vmap(lambda k: flat(estimator(k, *args)[1])))(keys)


def brute_force_variance(params, c):
    """The docstring's variance for K = 1, from explicit per-sample quantities: ``g_n`` by
    ``jax.grad`` of the sample's loss with respect to perturbations added to the three
    pre-activations, ``J_n`` block-diagonal from ``jax.jacfwd`` of each layer's own affine map
    at its recorded input."""
    layers = [params["params"][f"Dense_{i}"] for i in range(3)]
    acts = [jax.nn.relu, jnp.tanh, lambda z: z]

    def sample_loss(eps, x, y):
        inputs = []
        for layer, act, e in zip(layers, acts, eps, strict=True):
            inputs.append(x)
            x = act(x @ layer["kernel"] + layer["bias"] + e)
        return LOSS(x, y), inputs

    total = 0.0
    for n in range(X.shape[0]):
        eps = [jnp.zeros(w) for w in WIDTHS]
        g, inputs = jax.grad(sample_loss, has_aux=True)(eps, X[n], Y[n])
        g = jnp.concatenate(g)
        blocks = []
        for layer, x in zip(layers, inputs, strict=True):
            jac = jax.jacfwd(lambda p, x=x: x @ p["kernel"] + p["bias"])(layer)
            blocks.append(jnp.concatenate([j.reshape(len(j), -1) for j in jax.tree.leaves(jac)], 1))
        jn = jax.scipy.linalg.block_diag(*blocks)
        a = jn @ jn.T
        jtg = jn.T @ g
        total += g @ g * jnp.trace(a) + jtg @ jtg - 2 * c * jnp.sum(g**2 * jnp.diag(a))
    return total / X.shape[0] ** 2


@pytest.mark.parametrize("distribution,c", [("normal", 0), ("rademacher", 1)])
def test_activity_grad_unbiased_with_the_docstring_variance(distribution, c):
    estimator = fwdgrad.value_and_activity_grad(MODEL.apply, LOSS, distribution=distribution)
    samples = sample_estimates(estimator, 8192, PARAMS, X, Y)
    exact = flat(jax.grad(mean_loss)(PARAMS))
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - exact) <= 5 * stderr + 1e-6)
    variance = jnp.sum((samples - exact) ** 2, axis=1).mean()
    np.testing.assert_allclose(variance, brute_force_variance(PARAMS, c), rtol=0.12)


def test_activity_grad_directions_average():
    """K directions average: the variance falls by K, the mean stays the gradient."""
    k = 4
    estimator = fwdgrad.value_and_activity_grad(MODEL.apply, LOSS, num_directions=k)
    samples = sample_estimates(estimator, 4096, PARAMS, X, Y)
    exact = flat(jax.grad(mean_loss)(PARAMS))
    variance = jnp.sum((samples - exact) ** 2, axis=1).mean()
    np.testing.assert_allclose(variance, brute_force_variance(PARAMS, 0) / k, rtol=0.12)
    value, _ = estimator(jax.random.key(0), PARAMS, X, Y)
    np.testing.assert_allclose(value, mean_loss(PARAMS), rtol=1e-6)


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 1), padding="SAME")(x))
        x = nn.Conv(2, (2, 2), padding="VALID", feature_group_count=1)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_activity_grad_conv_unbiased():
    model = TinyCNN()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5, 4, 2)), jnp.float32)
    y = jnp.arange(4) % 3
    params = model.init(jax.random.key(3), x)
    estimator = fwdgrad.value_and_activity_grad(model.apply, LOSS, distribution="rademacher")
    samples = sample_estimates(estimator, 8192, params, x, y)
    exact = flat(jax.grad(lambda p: LOSS(model.apply(p, x), y).mean())(params))
    stderr = samples.std(0) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(samples.mean(0) - exact) <= 5 * stderr + 1e-6)


class WithLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.LayerNorm()(x))


def test_activity_grad_refuses_what_it_cannot_estimate():
    params = WithLayerNorm().init(jax.random.key(0), X)
    estimator = fwdgrad.value_and_activity_grad(WithLayerNorm().apply, LOSS)
    with pytest.raises(ValueError, match=r"no such call owns .*LayerNorm_0"):
        estimator(jax.random.key(0), params, X, Y)
    mean = fwdgrad.value_and_activity_grad(MODEL.apply, lambda o, y: LOSS(o, y).mean())
    with pytest.raises(ValueError, match=r"per-sample floating losses of shape \(6,\)"):
        mean(jax.random.key(0), PARAMS, X, Y)
    with pytest.raises(ValueError, match="distribution"):
        fwdgrad.value_and_activity_grad(MODEL.apply, LOSS, distribution="uniform")
    with pytest.raises(ValueError, match="num_directions"):
        fwdgrad.activity_grad(MODEL.apply, LOSS, num_directions=0)


# --- local losses -----------------------------------------------------------------------------

HIDDEN, HEAD = nn.Dense(4), nn.Dense(3)


def block(p, h):
    h = nn.relu(HIDDEN.apply(p["hidden"], h))
    return h, HEAD.apply(p["head"], h)


BLOCKS = [block, block, lambda p, h: (h, HEAD.apply(p, h))]


def local_params():
    keys = jax.random.split(jax.random.key(4), 5)
    h = jnp.ones((1, 4))
    first = {"hidden": HIDDEN.init(keys[0], X), "head": HEAD.init(keys[1], h)}
    second = {"hidden": HIDDEN.init(keys[2], h), "head": HEAD.init(keys[3], h)}
    return [first, second, HEAD.init(keys[4], h)]


def local_objective(params):
    """sum_b L_b(theta_b; sg(h_{b-1})), written out by hand."""
    h, total = X, 0.0
    for f, p in zip(BLOCKS, params, strict=True):
        h, out = f(p, jax.lax.stop_gradient(h))
        total += LOSS(out, Y).mean()
    return total


def test_local_grad_unbiased_for_the_stop_gradient_objective():
    params = local_params()
    estimator = fwdgrad.value_and_local_grad(BLOCKS, LOSS)
    samples = sample_estimates(estimator, 8192, params, X, Y)
    exact = flat(jax.grad(local_objective)(params))
    stderr = samples.std(0) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(samples.mean(0) - exact) <= 5 * stderr + 1e-6)
    losses, _ = estimator(jax.random.key(0), params, X, Y)
    np.testing.assert_allclose(losses.sum(), local_objective(params), rtol=1e-6)
    predict = fwdgrad.chain_blocks(BLOCKS)(params, X)
    np.testing.assert_allclose(losses[-1], LOSS(predict, Y).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="one entry per block"):
        estimator(jax.random.key(0), params[:2], X, Y)
    with pytest.raises(TypeError, match="blocks"):
        fwdgrad.value_and_local_grad([], LOSS)


# --- no backward pass -------------------------------------------------------------------------


def backward_products(closed, kernels):
    """Equations that propagate a signal backwards through a layer: a ``dot_general`` that
    contracts a 2-D kernel's output axis (axis 1), or a ``transpose`` of a kernel. A forward
    pass and its tangents contract only the kernel's input axis (axis 0); reverse mode reaches
    a layer's input with ``cotangent @ kernel.T``, which contracts axis 1. ``kernels``: the
    indices of the kernels among the jaxpr's inputs; they are followed through dtype
    conversions, copies and into the sub-jaxprs (``jit``, custom derivatives) they enter."""
    found = []

    def walk(jaxpr, tracked):
        tracked = set(tracked)
        for eqn in jaxpr.eqns:
            hit = [
                i
                for i, v in enumerate(eqn.invars)
                if not isinstance(v, jax.extend.core.Literal) and v in tracked
            ]
            if eqn.primitive.name == "dot_general" and hit:
                (contract_l, contract_r), _ = eqn.params["dimension_numbers"]
                for i in hit:
                    if 1 in (contract_l, contract_r)[i]:
                        found.append(eqn)
            elif eqn.primitive.name == "transpose" and hit:
                found.append(eqn)
            elif eqn.primitive.name in ("convert_element_type", "copy", "copy_p") and hit:
                tracked.update(eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                inner = {sub.invars[i] for i in hit if i < len(sub.invars)}
                if inner:
                    walk(sub, inner)

    walk(closed.jaxpr, {closed.jaxpr.invars[i] for i in kernels})
    return found


def kernel_indices(params):
    return [i for i, leaf in enumerate(jax.tree.leaves(params)) if leaf.ndim == 2]


def sgd_step(gradient):
    """A whole training step: estimate, optax SGD update, new parameters."""
    tx = optax.sgd(0.1)

    def step(params, key):
        grads = gradient(key, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    return step


def test_no_backward_pass_in_the_steps():
    estimator = fwdgrad.activity_grad(MODEL.apply, LOSS)
    local = fwdgrad.value_and_local_grad(BLOCKS, LOSS)
    cases = [
        (PARAMS, lambda k, p: estimator(k, p, X, Y)),
        (local_params(), lambda k, p: local(k, p, X, Y)[1]),
    ]
    for params, gradient in cases:
        closed = jax.make_jaxpr(jax.jit(sgd_step(gradient)))(params, jax.random.key(0))
        assert backward_products(closed, kernel_indices(params)) == []
    # the check sees reverse mode: backprop's step multiplies by the kernels transposed
    backprop = jax.make_jaxpr(jax.jit(sgd_step(lambda k, p: jax.grad(mean_loss)(p))))
    found = backward_products(backprop(PARAMS, jax.random.key(0)), kernel_indices(PARAMS))
    assert len(found) == 2  # the cotangents of the two hidden layers' inputs


def test_harness_local_gradient_feeds_an_optax_step():
    """The local-loss gradient function in a training step: the loss it reports is the
    model's, and SGD on the estimate moves every block."""
    problem = train.Problem(fwdgrad.chain_blocks(BLOCKS))
    params = local_params()
    tx = optax.sgd(0.1)
    step = jax.jit(train.make_step(problem, tx, train.local_gradient(BLOCKS), lambda x: x))
    state, loss = step(train.init_state(params, tx, jax.random.key(0)), X, Y)
    np.testing.assert_allclose(loss, problem.loss_fn(params, X, Y), rtol=1e-6)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, params)
    assert all(jax.tree.leaves(moved))
    with pytest.raises(ValueError, match="distribution"):
        train.local_gradient(BLOCKS, distribution="uniform")
