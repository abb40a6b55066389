"""A zoo of user-style models through every quantity of ``curvature.value_and_grad`` (but
``diag_h``, ``diag_h_batch`` and ``kfra``), against brute force, plus the invariants between
the quantities and the errors for what the engine refuses.

Deterministic models are checked against ``tests/reference.py`` (a loop over samples). Random
ones (dropout with its key fixed inside ``apply_fn``) against :func:`batch_reference`, the
same quantities from ``jax.jacrev`` of the whole batch's per-sample loss terms and outputs,
so that every sample sees the batch's dropout mask. Monte Carlo quantities are checked
against the ``sqrt_ggn_mc`` columns drawn with the same key (their squares and Gram blocks).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxopt_suite import curvature
from tests import reference
from tests.curvature.helpers import (
    EXACT,
    TOL,
    assert_tree_close,
    init,
    labels,
    linen_apply,
    rand,
)
from tests.reference import random_like

EVERY = (
    *EXACT,
    "sqrt_ggn_exact",
    "kflr",
    "diag_ggn_mc",
    "diag_ggn_mc_batch",
    "sqrt_ggn_mc",
    "kfac",
)
KEY = jax.random.key(7)

# --- models -----------------------------------------------------------------------------------


class DropoutMLP(nn.Module):
    """Dense - tanh - dropout - Dense; with ``norm`` a GroupNorm (generic path) before tanh."""

    norm: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        if self.norm:
            h = nn.GroupNorm(num_groups=2)(h)
        h = nn.Dropout(0.5, deterministic=False)(jnp.tanh(h))
        return nn.Dense(3)(h)


class GroupNormCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(3)(jnp.mean(h, axis=(1, 2)))


class BatchNormMLP(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(4)(x))
        return nn.Dense(3)(jnp.tanh(h))


class CausalTransformer(nn.Module):
    """Embedding, LayerNorm, single-head causal self-attention, logits at every position."""

    vocab: int = 5
    dim: int = 4

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.dim)(tokens)
        q, k, v = jnp.split(nn.Dense(3 * self.dim)(nn.LayerNorm()(h)), 3, axis=-1)
        t = tokens.shape[1]
        scores = jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(self.dim)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        h = h + jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(self.vocab)(h)


class ScaledDense(nn.Module):
    """A Dense output times ``exp(s)`` for a scalar ``s``, plus a ``(1,)`` offset."""

    @nn.compact
    def __call__(self, x):
        s = self.param("s", nn.initializers.zeros, ())
        offset = self.param("offset", nn.initializers.zeros, (1,))
        return nn.Dense(3)(x) * jnp.exp(s) + offset


class MaxPoolCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.max_pool(nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.norm(self.inp(x))))


def _dropout_apply(model):
    dropout_key = jax.random.key(3)
    return lambda p, x: model.apply({"params": p}, x, rngs={"dropout": dropout_key})


def _batch_norm_eval():
    model = BatchNormMLP(train=False)
    x = rand((4, 3))
    stats = {"BatchNorm_0": {"mean": rand((4,), seed=5), "var": 1.0 + rand((4,), seed=6) ** 2}}
    params = init(model, x)
    return lambda p, x: model.apply({"params": p, "batch_stats": stats}, x), params, x


@functools.cache
def case(name):
    """``(apply_fn, params, inputs, targets, loss, random)`` of one tiny model."""
    if name in ("dropout_mlp", "dropout_groupnorm"):
        model = DropoutMLP(norm=name == "dropout_groupnorm")
        x = rand((4, 3))
        return _dropout_apply(model), init(model, x), x, labels((4,), 3), "cross_entropy", True
    if name == "groupnorm_cnn":
        x = rand((3, 5, 5, 2))
        model = GroupNormCNN()
        return linen_apply(model), init(model, x), x, labels((3,), 3), "cross_entropy", False
    if name == "batchnorm_eval":
        apply_fn, params, x = _batch_norm_eval()
        return apply_fn, params, x, rand((4, 3), seed=7), "mse", False
    if name == "causal_transformer":
        tokens = labels((2, 4), 5, seed=8)
        model = CausalTransformer()
        params = init(model, tokens)
        return linen_apply(model), params, tokens, labels((2, 4), 5), "cross_entropy", False
    if name == "scalar_parameter":
        x = rand((4, 3))
        model = ScaledDense()
        params = random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], std=0.5)
        return linen_apply(model), params, x, rand((4, 3), seed=9), "mse", False
    if name == "maxpool_cnn":
        x = rand((3, 4, 4, 2))
        model = MaxPoolCNN()
        return linen_apply(model), init(model, x), x, labels((3,), 3), "cross_entropy", False
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    x = rand((3, 3))
    apply_fn = lambda s, inputs: nnx.merge(graphdef, s)(inputs)
    return apply_fn, random_like(state), x, labels((3,), 2), "cross_entropy", False


MODELS = (
    "dropout_mlp",
    "dropout_groupnorm",
    "groupnorm_cnn",
    "batchnorm_eval",
    "causal_transformer",
    "nnx",
    "scalar_parameter",
    "maxpool_cnn",
)

# --- brute force for random models ---------------------------------------------------------------


def batch_reference(apply_fn, params, x, y, loss, reduction="mean"):
    """The exact quantities of :func:`tests.reference.quantities` (with ``full_ggn``), from
    the whole batch's forward pass: per-sample gradients are the rows of ``jax.jacrev`` of the
    vector of per-sample loss terms, per-sample GGNs ``J_n^T H_n J_n`` take ``J_n`` from
    ``jax.jacrev`` of the batch's outputs. Valid for models whose samples do not interact,
    random or not (every sample sees the batch's random numbers)."""
    flat_params, unravel = ravel_pytree(params)
    one = reference.per_sample_loss(loss)

    @jax.jit
    def run(flat_params):
        out = apply_fn(unravel(flat_params), x)
        n, shape = out.shape[0], out.shape[1:]
        c = 1.0 / reference.normaliser(loss, out.shape, reduction)
        terms = lambda v: c * jax.vmap(one)(apply_fn(unravel(v), x), y)
        jac = jax.jacrev(lambda v: apply_fn(unravel(v), x))(flat_params).reshape(
            n, -1, flat_params.size
        )
        h = jax.vmap(jax.hessian(lambda o, yn: c * one(o.reshape(shape), yn)))(
            out.reshape(n, -1), y
        )
        ggn = jnp.einsum("ndp,nde,neq->npq", jac, h, jac)
        return jnp.sum(terms(flat_params)), jax.jacrev(terms)(flat_params), ggn

    value, g, ggn = (np.asarray(a, np.float64) for a in run(flat_params))
    n = g.shape[0]
    sgs = (g**2).sum(0)
    unflat = functools.partial(reference.unflat, params)
    return {
        "value": float(value),
        "grad": unflat(g.sum(0)),
        "grad_batch": unflat(g, lead=1),
        "batch_l2": jax.tree.unflatten(
            jax.tree.structure(params),
            [(g[:, w] ** 2).sum(1) for w in reference.leaf_slices(params)],
        ),
        "sum_grad_squared": unflat(sgs),
        "variance": unflat(sgs / n - (g.sum(0) / n) ** 2),
        "diag_ggn_exact": unflat(np.einsum("npp->p", ggn)),
        "diag_ggn_exact_batch": unflat(np.einsum("npp->np", ggn), lead=1),
        "ggn_blocks": reference.leaf_blocks(params, ggn.sum(0)),
    }


def brute_force(name):
    apply_fn, params, x, y, loss, random = case(name)
    if random:
        return batch_reference(apply_fn, params, x, y, loss)
    return reference.quantities(apply_fn, params, x, y, loss, full_ggn=True)


# --- checks --------------------------------------------------------------------------------------


def _close(a, b, tol=None):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **(tol or TOL))


def check_invariants(grads, extras):
    """The relations between the quantities, per leaf, that hold for every model and path."""
    for name in ("grad_batch", "batch_l2", "sum_grad_squared", "variance"):
        assert jax.tree.structure(extras[name]) == jax.tree.structure(grads)
    leaves = lambda q: jax.tree.leaves(extras[q])
    for g, gb, l2, sgs, var in zip(
        jax.tree.leaves(grads), *(leaves(q) for q in EXACT[:4]), strict=True
    ):
        gb = np.asarray(gb, np.float64)
        _close(gb.sum(0), g)
        _close(l2, (gb**2).reshape(len(gb), -1).sum(1))
        _close(sgs, (gb**2).sum(0))
        _close(var, ((gb - gb.mean(0)) ** 2).mean(0))
        assert np.all(np.asarray(var) >= 0)
    for exact in ("exact", "mc"):
        for d, db, v in zip(
            leaves(f"diag_ggn_{exact}"),
            leaves(f"diag_ggn_{exact}_batch"),
            leaves(f"sqrt_ggn_{exact}"),
            strict=True,
        ):
            v = np.asarray(v, np.float64)
            _close(db, (v**2).sum(0))
            _close(d, (v**2).sum((0, 1)))


def check_model(name, **kw):
    apply_fn, params, x, y, loss, _ = case(name)
    want = brute_force(name)
    fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=EVERY, **kw)
    value, grads, extras = jax.jit(fn)(params, x, y, key=KEY)
    _close(value, want["value"])
    assert_tree_close(grads, want["grad"])
    for q in EXACT:
        assert_tree_close(extras[q], want[q])
    check_invariants(grads, extras)
    gram = lambda v: reference.square_root_gram(np.reshape(v, (*v.shape[:2], -1)), False)
    for v, v_mc, kflr, kfac, block in zip(
        jax.tree.leaves(extras["sqrt_ggn_exact"]),
        jax.tree.leaves(extras["sqrt_ggn_mc"]),
        factors(extras["kflr"]),
        factors(extras["kfac"]),
        jax.tree.leaves(want["ggn_blocks"]),
        strict=True,
    ):
        _close(gram(v), block)
        if kflr is not None and len(kflr) == 1:  # a 1-D leaf: its exact GGN block
            _close(kflr[0], block)
            _close(kfac[0], gram(v_mc))  # the same Monte Carlo columns


def factors(tree):
    """A Kronecker quantity's per-leaf entries: ``(A, G)``, ``(B,)`` or None."""
    return jax.tree.leaves(tree, is_leaf=lambda a: a is None or isinstance(a, tuple))


@pytest.mark.parametrize("name", MODELS)
def test_every_quantity_against_brute_force(name):
    check_model(name)


def test_dropout_generic_path_uses_the_batch_mask():
    """Every leaf on the generic path (one VJP of the whole batch per sample), same mask, in
    chunks that don't divide the batch."""
    check_model("dropout_groupnorm", structured=False, chunk_size=3)


def test_kflr_of_one_sample_is_the_dense_kernels_ggn_block():
    """For N = 1 (no positions), kron(A, G) is a Dense kernel's exact GGN block; with dropout
    on the batch's mask."""
    apply_fn, params, x, y, loss, _ = case("dropout_mlp")
    want = batch_reference(apply_fn, params, x[:1], y[:1], loss)["ggn_blocks"]
    fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=("kflr",))
    got = jax.jit(fn)(params, x[:1], y[:1])[2]["kflr"]
    for layer in ("Dense_0", "Dense_1"):
        a, g = got[layer]["kernel"]
        _close(np.kron(a, g), want[layer]["kernel"])
        _close(got[layer]["bias"][0], want[layer]["bias"])


def test_dropout_reference_differs_from_per_sample_masks():
    """The check above is not vacuous: one sample at a time sees other dropout masks."""
    apply_fn, params, x, y, loss, _ = case("dropout_mlp")
    per_sample = reference.quantities(apply_fn, params, x, y, loss)["grad_batch"]
    batched = brute_force("dropout_mlp")["grad_batch"]
    gap = max(
        np.max(np.abs(a - b))
        for a, b in zip(*map(jax.tree.leaves, (per_sample, batched)), strict=True)
    )
    assert gap > 1e-2


def test_variance_without_grad_batch():
    """From sum_grad_squared and the gradient (no individual gradients): brute force on the
    batch, exactly 0 on a single sample, on both paths."""
    apply_fn, params, x, y, loss, _ = case("groupnorm_cnn")
    want = brute_force("groupnorm_cnn")["variance"]
    for structured in (True, False):
        fn = jax.jit(
            curvature.value_and_grad(
                apply_fn, loss=loss, quantities=("variance",), structured=structured
            )
        )
        assert_tree_close(fn(params, x, y)[2]["variance"], want)
        for v in jax.tree.leaves(fn(params, x[:1], y[:1])[2]["variance"]):
            np.testing.assert_array_equal(v, 0.0)


def test_single_sample_variance_with_grad_batch_is_exactly_zero():
    apply_fn, params, x, y, loss, _ = case("dropout_groupnorm")
    fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=("grad_batch", "variance"))
    for v in jax.tree.leaves(jax.jit(fn)(params, x[:1], y[:1])[2]["variance"]):
        np.testing.assert_array_equal(v, 0.0)


# --- what the engine refuses, and has_aux ------------------------------------------------------


def test_batch_statistics_are_refused_but_the_gradient_works():
    model = BatchNormMLP(train=True)
    x, y = rand((4, 3)), rand((4, 3), seed=7)
    params = init(model, x)
    stats = {"BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}

    def apply_fn(p, x):
        return model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

    fn = curvature.value_and_grad(apply_fn, loss="mse", quantities=("grad_batch",), has_aux=True)
    with pytest.raises(ValueError, match=r"BatchNorm_0.*use_running_average=True"):
        fn(params, x, y)
    plain = curvature.value_and_grad(apply_fn, loss="mse", has_aux=True)
    (value, aux), grads, extras = jax.jit(plain)(params, x, y)
    loss_fn = lambda p: reference.batch_loss("mse")(apply_fn(p, x)[0], y)
    want_value, want_grads = jax.value_and_grad(loss_fn)(params)
    _close(value, want_value)
    assert_tree_close(grads, want_grads)
    assert extras == {}
    assert_tree_close(aux, apply_fn(params, x)[1])


def test_has_aux_returns_the_batched_forwards_aux():
    apply_fn, params, x, y, loss, _ = case("dropout_mlp")
    with_aux = lambda p, x: (apply_fn(p, x), {"mean_output": jnp.mean(apply_fn(p, x))})
    fn = curvature.value_and_grad(with_aux, loss=loss, quantities=("grad_batch",), has_aux=True)
    (value, aux), grads, extras = jax.jit(fn)(params, x, y)
    _close(aux["mean_output"], jnp.mean(apply_fn(params, x)))
    plain = curvature.value_and_grad(apply_fn, loss=loss, quantities=("grad_batch",))
    want_value, want_grads, want_extras = jax.jit(plain)(params, x, y)
    _close(value, want_value)
    assert_tree_close(grads, want_grads)
    assert_tree_close(extras, want_extras)


def test_has_aux_with_diag_h():
    """The Hessian's own forward pass (activation curvature) with has_aux."""
    model = nn.Sequential([nn.Dense(4), jnp.tanh, nn.Dense(3)])
    x, y = rand((3, 2)), labels((3,), 3)
    params, apply_fn = init(model, x), linen_apply(model)
    with_aux = lambda p, x: (apply_fn(p, x), jnp.sum(x))
    fn = curvature.value_and_grad(
        with_aux, loss="cross_entropy", quantities=("diag_h",), has_aux=True
    )
    (value, aux), grads, extras = jax.jit(fn)(params, x, y)
    want = reference.quantities(apply_fn, params, x, y, "cross_entropy", hessian=True)
    _close(aux, jnp.sum(x))
    _close(value, want["value"])
    assert_tree_close(grads, want["grad"])
    assert_tree_close(extras["diag_h"], want["diag_h"])


def test_output_errors():
    apply_fn, params, x, y, loss, _ = case("scalar_parameter")
    pair = lambda p, x: (apply_fn(p, x), None)
    with pytest.raises(TypeError, match="has_aux=True"):
        curvature.value_and_grad(pair, loss=loss)(params, x, y)
    with pytest.raises(TypeError, match=r"pair \(outputs, aux\)"):
        curvature.value_and_grad(apply_fn, loss=loss, has_aux=True)(params, x, y)
    with pytest.raises(TypeError, match="has_aux must be True or False"):
        curvature.value_and_grad(apply_fn, loss=loss, has_aux="yes")


def test_integer_parameters_are_refused_by_name():
    apply_fn = lambda p, x: x @ p["w"] * p["count"]
    params = {"w": rand((3, 2)), "count": jnp.array(2)}
    fn = curvature.value_and_grad(apply_fn, loss="mse", quantities=("batch_l2",))
    with pytest.raises(TypeError, match=r"\['count'\] \(int32\)"):
        fn(params, rand((4, 3)), rand((4, 2)))


def test_samples_mixed_by_hand_are_refused():
    apply_fn = lambda p, x: (x - jnp.mean(x, axis=0)) @ p
    fn = curvature.value_and_grad(apply_fn, loss="mse", quantities=("diag_ggn_exact",))
    with pytest.raises(ValueError, match=r"reduce_sum at .*test_user_models\.py"):
        fn(rand((3, 2)), rand((4, 3)), rand((4, 2)))


def test_diag_h_of_a_random_model_is_refused():
    apply_fn, params, x, y, loss, _ = case("dropout_mlp")
    fn = curvature.value_and_grad(apply_fn, loss=loss, quantities=("diag_h",))
    with pytest.raises(ValueError, match="draws random numbers"):
        fn(params, x, y)
