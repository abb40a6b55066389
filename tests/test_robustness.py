"""Property-based robustness: every public transformation and proximal operator on awkward
pytrees, half-precision dtypes and non-finite entries.

Properties, checked on a few fixed tree structures (nested dicts, lists, 0-d leaves, empty
leaves, zero-size axes; few structures so that each transformation compiles once per structure
and dtype) whose values hypothesis draws:

* finite inputs: ``update`` returns finite updates with the parameters' structure, shapes and
  dtypes (float16, bfloat16, float32, float64 when x64 is enabled, or a mix across leaves), or
  raises a clear error;
* a NaN or ±inf in the gradient, the loss or the parameters: the transformations that skip
  such a step (AliG, the forward gradient; Kronecker preconditioning for its factors) still
  return finite updates and a finite state; the others propagate the non-finite entry, as
  optax's own transformations do, and keep structure and dtypes;
* inside ``train.make_step``, with a NaN or ±inf injected into the loss, the gradient or the
  curvature extras at any step, no NaN or inf ever reaches the parameters or the optimizer
  state.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, example, given, settings

import jaxopt_suite
from jaxopt_suite import kronecker, precondition, prox, train
from jaxopt_suite._tree import all_finite

SETTINGS = settings(
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Shapes of the parameter trees: a flax-like layer dict with a 0-d leaf; a list holding a
# layer, a vector and an empty list, an empty leaf and an empty dict; zero-size axes (a layer
# with no units, a kernel with no inputs); a bare array.
STRUCTURES = [
    {"Dense_0": {"kernel": (3, 2), "bias": (2,)}, "scale": ()},
    {"layers": [{"kernel": (2, 2), "bias": (2,)}, (4,), []], "empty": (0,), "none": {}},
    {"Dense_0": {"kernel": (3, 0), "bias": (0,)}, "Dense_1": {"kernel": (0, 2), "bias": (2,)}},
    (3,),
]
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32] + (
    [jnp.float64] if jax.config.jax_enable_x64 else []
)
NON_FINITE = [np.nan, np.inf, -np.inf]


def is_shape(x):
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def make_tree(structure, dtype, rng, low=-2.0, high=2.0):
    """Uniform values of ``structure``'s shapes; ``dtype="mixed"`` cycles through DTYPES."""
    shapes, treedef = jax.tree.flatten(structure, is_leaf=is_shape)
    dtypes = DTYPES if dtype == "mixed" else [dtype]
    return treedef.unflatten(
        [
            jnp.asarray(rng.uniform(low, high, size=s), dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)
        ]
    )


def corrupt(tree, rng, bad):
    """``tree`` with one entry of a non-empty leaf set to ``bad`` (the tree itself when every
    leaf is empty)."""
    leaves, treedef = jax.tree.flatten(tree)
    candidates = [i for i, x in enumerate(leaves) if x.size]
    if not candidates:
        return tree
    i = candidates[rng.integers(len(candidates))]
    flat = np.array(leaves[i], np.float32).reshape(-1)
    flat[rng.integers(flat.size)] = bad
    leaves[i] = jnp.asarray(flat.reshape(leaves[i].shape), leaves[i].dtype)
    return treedef.unflatten(leaves)


def loss_of(params):
    """A smooth loss of every leaf, accumulated in float32."""
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(params):
        x = x.astype(jnp.float32)
        total = total + jnp.sum(0.5 * x**2 + jnp.sin(x))
    return total


def factors_of(params, rng):
    """Kronecker factors for every leaf with an axis: M Mᵀ / n + I, symmetric positive."""

    def spd(n):
        m = rng.normal(size=(n, n))
        return jnp.asarray(m @ m.T / max(n, 1) + np.eye(n), jnp.float32)

    def one(p):
        shapes = kronecker.factor_shapes(p.shape)
        return None if shapes is None else tuple(spd(s[0]) for s in shapes)

    return jax.tree.map(one, params)


ALIG = frozenset({"grads", "value"})  # a skipped step: zero updates
FWDGRAD = frozenset({"value", "params"})  # value_fn is not finite: a skipped step
NONE = frozenset()
# name -> (transformation, where a non-finite entry may reach the updates, where it gives a
# skipped step). Where neither, the entry is not read (or is ignored, like Kronecker factors
# with a non-finite entry) and the updates must be finite. Each update gets every extra argument.
TRANSFORMS = {
    "alig": (lambda: jaxopt_suite.alig(0.5, momentum=0.9), NONE, ALIG),
    "alig_adjusted": (
        lambda: jaxopt_suite.alig(None, momentum=0.5, adjusted_momentum=True),
        NONE,
        ALIG,
    ),
    "scale_by_alig": (lambda: jaxopt_suite.scale_by_alig(0.5), NONE, ALIG),
    "proximal_l1": (lambda: jaxopt_suite.proximal(prox.l1, 0.1, 0.5), {"grads", "params"}, NONE),
    "proximal_linf1": (
        lambda: jaxopt_suite.proximal(prox.linf1, 0.1, 0.5),
        {"grads", "params"},
        NONE,
    ),
    "group_sparsity_l21": (
        lambda: jaxopt_suite.group_sparsity(0.1, 0.5),
        {"grads", "params"},
        NONE,
    ),
    "group_sparsity_linf1": (
        lambda: jaxopt_suite.group_sparsity(0.1, 0.5, "linf1"),
        {"grads", "params"},
        NONE,
    ),
    "forward_gradient": (
        lambda: jaxopt_suite.forward_gradient(jax.random.key(0), 2),
        NONE,
        FWDGRAD,
    ),
    "forward_gradient_one_layer": (
        lambda: jaxopt_suite.forward_gradient(
            jax.random.key(0),
            distribution="rademacher",
            structure="rank_one",
            perturb="one_layer",
            layer_probabilities="size",
        ),
        NONE,
        FWDGRAD,
    ),
    "scale_by_diagonal_curvature": (
        lambda: precondition.scale_by_diagonal_curvature(0.5),
        {"grads", "extras"},
        NONE,
    ),
    "diag_ggn_sgd": (lambda: precondition.diag_ggn_sgd(0.1), {"grads", "extras"}, NONE),
    "scale_by_kronecker": (
        lambda: kronecker.scale_by_kronecker(1e-2, inverse_every=1),
        {"grads"},
        NONE,
    ),
    "kfac_sgd": (lambda: kronecker.kfac_sgd(0.1, damping=1e-2), {"grads"}, NONE),
}


@functools.cache
def compiled_update(name, structure_index, dtype):
    """``(params, grads, state-free extras) -> (updates, state)`` of one fresh transformation,
    jitted once per transformation, structure and dtype (the values are arguments)."""
    tx = TRANSFORMS[name][0]()

    @jax.jit
    def update(params, grads, value, shift, curvature, factors):
        value_fn = lambda p: loss_of(p) + shift
        state = tx.init(params)
        return tx.update(
            grads,
            state,
            params,
            value=value,
            value_fn=value_fn,
            curvature=curvature,
            factors=factors,
        )

    return update


def check_like(updates, params):
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype, (u.shape, u.dtype, p.shape, p.dtype)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@SETTINGS
@given(
    structure_index=st.integers(0, len(STRUCTURES) - 1),
    dtype=st.sampled_from([*DTYPES, "mixed"]),
    seed=st.integers(0, 2**31 - 1),
    where=st.sampled_from([None, "grads", "value", "params", "extras"]),
    bad=st.sampled_from(NON_FINITE),
)
@example(structure_index=1, dtype="mixed", seed=0, where=None, bad=np.nan)
@example(structure_index=2, dtype=jnp.bfloat16, seed=1, where="grads", bad=np.inf)
def test_transformation_returns_finite_updates_like_the_params(
    name, structure_index, dtype, seed, where, bad
):
    rng = np.random.default_rng(seed)
    params = make_tree(STRUCTURES[structure_index], dtype, rng)
    grads = make_tree(STRUCTURES[structure_index], dtype, rng)
    curvature = jax.tree.map(jnp.abs, make_tree(STRUCTURES[structure_index], dtype, rng))
    factors = factors_of(params, rng)
    value = jnp.float32(loss_of(params) + 10.0)  # above f_min = 0 and positive
    shift = jnp.float32(0.0)
    if where == "grads":
        grads = corrupt(grads, rng, bad)
    elif where == "params":
        params = corrupt(params, rng, bad)
    elif where == "value":
        value, shift = jnp.float32(bad), jnp.float32(bad)
    elif where == "extras":
        curvature = corrupt(curvature, rng, abs(bad))
        factors = corrupt(factors, rng, bad)
    update = compiled_update(name, structure_index, str(dtype))
    if name == "proximal_linf1" and any(p.ndim == 0 for p in jax.tree.leaves(params)):
        with pytest.raises(ValueError, match=r"proximal: prox_fn failed on the parameter .*\(\)"):
            update(params, grads, value, shift, curvature, factors)
        return
    updates, state = update(params, grads, value, shift, curvature, factors)
    check_like(updates, params)
    _, propagates, skips = TRANSFORMS[name]
    if where not in propagates:
        assert bool(all_finite(updates)), (name, where)
        assert bool(all_finite(state)), (name, where)
    if where in skips:
        assert all(not np.any(np.asarray(u, np.float32)) for u in jax.tree.leaves(updates))


PROX_OPERATORS = {
    "l1": prox.l1,
    "l2": prox.l2,
    "l21": prox.l21,
    "linf": prox.linf,
    "linf1": prox.linf1,
    "elastic_net": functools.partial(prox.elastic_net, gamma=0.5),
    "log_barrier": prox.log_barrier,
    "l0": prox.l0,
    "project_l1_ball": prox.project_l1_ball,
}
OPERATOR_SHAPES = [(), (4,), (0,), (3, 0), (0, 3), (2, 3)]
GROUPED = ("l21", "linf1")


@functools.cache
def compiled_operator(name, shape, dtype):
    del shape, dtype  # the cache key: one compilation per operator, shape and dtype
    return jax.jit(PROX_OPERATORS[name])


@pytest.mark.parametrize("name", list(PROX_OPERATORS))
@SETTINGS
@given(
    shape=st.sampled_from(OPERATOR_SHAPES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    strength=st.sampled_from([0.0, 0.3, 1e4]),
    bad=st.sampled_from([None, *NON_FINITE]),
)
def test_operator_is_finite_and_keeps_shape_and_dtype(name, shape, dtype, seed, strength, bad):
    if name in GROUPED and len(shape) < 1:
        with pytest.raises(ValueError, match="group_axis"):
            PROX_OPERATORS[name](jnp.zeros(shape, dtype), strength)
        return
    rng = np.random.default_rng(seed)
    x = make_tree(shape, dtype, rng, 0.1 if name == "log_barrier" else -2.0, 2.0)
    if bad is not None:
        x = corrupt(x, rng, bad)
    out = compiled_operator(name, shape, jnp.dtype(dtype))(x, jnp.float32(strength))
    assert out.shape == x.shape and out.dtype == x.dtype
    if bad is None:
        assert bool(jnp.all(jnp.isfinite(out))), (name, shape, dtype, strength)


# --- inside the training step ------------------------------------------------------------


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


def injecting(gradient):
    """``gradient`` whose loss, direction and array extras get added the three numbers that
    the batch carries in the last three input columns of its first row (0, NaN or ±inf)."""

    def inject(problem, params, batch, key):
        inputs, labels = batch
        shift = inputs[0, -3:]
        value, direction, extra = gradient(problem, params, (inputs, labels), key)
        direction = jax.tree.map(lambda d: d + shift[1], direction)
        extra = dict(extra)
        for k, v in extra.items():
            if k == "value":
                extra[k] = v + shift[0]
            elif k == "value_fn":
                extra[k] = lambda p, f=v: f(p) + shift[0]
            else:
                extra[k] = jax.tree.map(lambda a: a + shift[2], v)
        return value + shift[0], direction, extra

    return inject


STEP_METHODS = {
    "alig": (lambda: jaxopt_suite.alig(0.5, momentum=0.9), train.backprop),
    "sgd+group_sparsity": (
        lambda: optax.chain(optax.sgd(0.1, momentum=0.9), jaxopt_suite.group_sparsity(0.1, 0.1)),
        train.backprop,
    ),
    "forward_gradient": (
        lambda: optax.chain(jaxopt_suite.forward_gradient(jax.random.key(0)), optax.sgd(0.1)),
        train.value_fn_gradient,
    ),
    "diag_ggn+momentum": (
        lambda: optax.chain(precondition.scale_by_diagonal_curvature(), optax.sgd(0.1, 0.9)),
        train.curvature_gradient("diag_ggn_mc"),
    ),
    "kfac_sgd": (
        lambda: kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1),
        train.curvature_gradient("kfac"),
    ),
}


@functools.cache
def compiled_step(name):
    model = TinyMLP()
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x[:, :-3]))
    make, gradient = STEP_METHODS[name]
    tx = make()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    step = jax.jit(train.make_step(problem, tx, injecting(gradient), preprocess=lambda x: x))
    return step, train.init_state(params, tx, jax.random.key(1))


@pytest.mark.parametrize("name", list(STEP_METHODS))
@settings(max_examples=4, deadline=None)
@given(
    shifts=st.lists(st.tuples(*[st.sampled_from([0.0, *NON_FINITE])] * 3), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
@example(shifts=[(0.0, 0.0, np.nan), (0.0, -np.inf, 0.0), (np.inf, 0.0, 0.0)], seed=0)
def test_make_step_never_lets_a_non_finite_value_into_params_or_state(name, shifts, seed):
    step, state = compiled_step(name)
    rng = np.random.default_rng(seed)
    for shift in [*shifts, (0.0, 0.0, 0.0)]:
        inputs = np.concatenate([rng.normal(size=(4, 2)), np.zeros((4, 3))], axis=1)
        inputs[0, -3:] = shift
        labels = jnp.asarray(rng.integers(0, 3, size=4))
        state, _ = step(state, jnp.asarray(inputs, jnp.float32), labels)
        assert bool(all_finite(state.params)), (name, shift)
        assert bool(all_finite(state.opt_state)), (name, shift)
    # the curvature methods' extras are arrays that the third shift reaches; the others' are
    # the loss (value=, value_fn=), which the first shift reaches
    reached = 3 if "kfac" in name or "diag_ggn" in name else 2
    assert int(state.skipped) == sum(any(s != 0 for s in shift[:reached]) for shift in shifts)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_integer_parameters_are_refused_by_every_transformation(name):
    """An integer leaf cannot take a gradient step (its update would round to nothing): every
    transformation refuses it when initialised, naming the leaf."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "count": jnp.array([1, 2], jnp.int32)}
    with pytest.raises(TypeError, match=r"\['count'\] \(int32\)"):
        TRANSFORMS[name][0]().init(params)
