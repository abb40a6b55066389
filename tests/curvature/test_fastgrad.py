"""The engine's faster conv / max-pool backward passes (``curvature.fastgrad``) against
``jax.vjp`` of the plain operations, and the engine with them against its generic path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxopt_suite import curvature
from jaxopt_suite.curvature import fastgrad, layers

TOL = {"atol": 1e-5, "rtol": 1e-5}

# (lhs shape, kernel shape, conv kwargs): channel-last, kernel (*spatial, C_in / G, C_out)
# banded: 2-D, stride 1, no dilation, one group; the others keep jax.vjp inside the wrapper
CONVS = {
    "valid": ((2, 7, 6, 3), (3, 2, 3, 4), {"padding": "VALID"}),
    "asym-pad": ((1, 5, 4, 2), (2, 3, 2, 2), {"padding": ((2, 0), (1, 3))}),
    "stride-dilation-groups": (
        (1, 7, 7, 4),
        (2, 2, 2, 4),
        {
            "padding": "SAME",
            "window_strides": (2, 1),
            "rhs_dilation": (1, 2),
            "feature_group_count": 2,
        },
    ),
    "1d": ((2, 9, 3), (3, 3, 2), {"padding": "SAME"}),
    "3d": ((1, 4, 4, 3, 2), (2, 2, 2, 2, 3), {"padding": "VALID"}),
}


def _plain(lhs_shape, kwargs):
    nd = len(lhs_shape) - 2
    dn = lax.conv_dimension_numbers(
        lhs_shape,
        (1,) * (nd + 2),
        ("N" + "HWD"[:nd] + "C", "HWD"[:nd] + "IO", "N" + "HWD"[:nd] + "C"),
    )
    full = {"window_strides": (1,) * nd, **kwargs, "dimension_numbers": dn}
    return lambda x, w: lax.conv_general_dilated(x, w, **full), full


@pytest.mark.parametrize("name", list(CONVS))
def test_fast_conv_matches_vjp_of_the_plain_convolution(name):
    lhs_shape, kernel_shape, kwargs = CONVS[name]
    k1, k2, k3 = jax.random.split(jax.random.key(len(name)), 3)
    x = jax.random.normal(k1, lhs_shape)
    w = jax.random.normal(k2, kernel_shape)
    plain, full = _plain(lhs_shape, kwargs)
    config = layers._conv_config(x, w, (), full)
    assert config is not None
    fast = lambda x, w: fastgrad.fast_conv(lax.conv_general_dilated, config, x, w, (), full)

    @jax.jit
    def both(x, w, ct):
        (out, back), (fast_out, fast_back) = jax.vjp(plain, x, w), jax.vjp(fast, x, w)
        return out, fast_out, back(ct), fast_back(ct)

    ct = jax.random.normal(k3, jax.eval_shape(plain, x, w).shape)
    out, fast_out, want, got = both(x, w, ct)
    np.testing.assert_array_equal(fast_out, out)  # the user's forward, bit for bit
    for g, wt in zip(got, want, strict=True):
        np.testing.assert_allclose(g, wt, **TOL)
    banded = name in ("valid", "asym-pad")
    assert fastgrad.band_supported(config, lhs_shape, kernel_shape) == banded


def test_banded_input_cotangent_is_the_transposed_convolution():
    # independent check: the input cotangent as the Jacobian transpose from jax.jacrev
    x = jnp.zeros((1, 4, 5, 2))
    w = jax.random.normal(jax.random.key(0), (3, 2, 2, 3))
    plain, full = _plain(x.shape, {"padding": ((1, 2), (0, 1))})
    config = layers._conv_config(x, w, (), full)
    ct = jax.random.normal(jax.random.key(1), jax.eval_shape(plain, x, w).shape)

    @jax.jit
    def both(ct, w):
        jac = jax.jacrev(lambda x: plain(x, w))(x)  # (*out, *x)
        return jnp.tensordot(ct, jac, axes=4), fastgrad.conv_input_cotangent(ct, w, config, x.shape)

    want, got = both(ct, w)
    np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(ValueError, match="config"):
        fastgrad.conv_input_cotangent(ct, w, config._replace(window_strides=(2, 1)), x.shape)


POOLS = {
    "2d": ((2, 6, 4, 3), (2, 2)),
    "2d-ragged": ((1, 7, 5, 2), (2, 2)),
    "1d": ((2, 9, 2), (3,)),
    "3d": ((1, 4, 4, 2, 2), (2, 2, 2)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_fast_max_pool_matches_vjp_including_ties(name):
    shape, window = POOLS[name]
    k1, k2 = jax.random.split(jax.random.key(len(name)))
    # small integers: many ties inside windows (the transpose sends to the first maximum)
    x = jax.random.randint(k1, shape, -2, 3).astype(jnp.float32)
    pool = lambda x: nn.max_pool(x, window, strides=window)
    ct = jax.random.normal(k2, jax.eval_shape(pool, x).shape)

    @jax.jit
    def both(x, ct):
        out, back = jax.vjp(pool, x)
        with fastgrad.patched_pooling():
            fast_out, fast_back = jax.vjp(pool, x)
        return out, fast_out, back(ct)[0], fast_back(ct)[0]

    out, fast_out, want, got = both(x, ct)
    assert lax.reduce_window is fastgrad._ORIGINAL_REDUCE_WINDOW  # restored
    np.testing.assert_array_equal(fast_out, out)
    np.testing.assert_array_equal(got, want)


def test_overlapping_or_padded_pooling_keeps_the_plain_transpose():
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 1))
    for kwargs in ({"strides": (1, 1)}, {"strides": (2, 2), "padding": "SAME"}):
        total = lambda x, kwargs=kwargs: nn.max_pool(x, (2, 2), **kwargs).sum()
        with fastgrad.patched_pooling():
            jaxpr = str(jax.make_jaxpr(jax.grad(total))(x))
        assert "select_and_scatter_add" in jaxpr
    with fastgrad.patched_pooling():
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: nn.max_pool(x, (2, 2), (2, 2)).sum()))(x))
    assert "select_and_scatter_add" not in jaxpr


class _NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv0 = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=rngs)
        self.conv1 = nnx.Conv(3, 4, (2, 2), padding="VALID", rngs=rngs)
        self.dense = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv0(x)), (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv1(x))
        return self.dense(x.reshape(x.shape[0], -1))


# linen CNNs with max-pooling take the fast backward in tests/curvature/test_engine.py and
# tests/curvature/test_models.py (against brute force); here an nnx one, against the engine's
# generic path (per-sample VJPs, no recorder).
def test_nnx_engine_with_fast_backward_matches_the_generic_path():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
    y = jnp.array([0, 2, 1])
    graphdef, params = nnx.split(_NnxCNN(nnx.Rngs(1)))
    apply = lambda p, x: nnx.merge(graphdef, p)(x)
    quantities = ("diag_ggn_exact",)  # the gradient column and the K = 3 loss-Hessian columns
    kinds = curvature.coverage(apply, params, x)
    assert {"conv", "dense"} == set(jax.tree.leaves(kinds))

    def run(structured):
        fn = curvature.value_and_grad(
            apply, loss="cross_entropy", quantities=quantities, structured=structured
        )
        lowered = jax.jit(lambda p: fn(p, x, y)).lower(params)
        return lowered.compile()(params), lowered.as_text()

    (fast, text), (generic, _) = run(True), run(False)
    assert "select_and_scatter" not in text  # nnx.max_pool took the mask backward
    ref = lambda p: -jnp.mean(jax.nn.log_softmax(apply(p, x))[jnp.arange(3), y])
    plain = jax.jit(jax.grad(ref)).lower(params)
    want_grads = plain.compile()(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[1], want_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[2], generic[2])
    # the user's model outside the engine's trace is untouched
    assert lax.reduce_window is fastgrad._ORIGINAL_REDUCE_WINDOW
    assert "select_and_scatter" in plain.as_text()


@pytest.mark.parametrize("groups", [1, 3, 16])
def test_columns_in_groups_equal_one_vjp_call_per_column(monkeypatch, groups):
    """``backprop.backpropagate_columns`` (groups of columns, one ``jax.vmap`` of the VJP per
    group, concatenated) through the fast conv / max-pool backward passes, against one call of
    the VJP per column; 1, 2, 5 and 7 columns in 2, 3 or one group per column."""
    from jaxopt_suite.curvature import EngineConfig, backprop, discovery

    config = EngineConfig(column_groups=groups)
    model = _NnxCNN(nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)
    x = jax.random.normal(jax.random.key(3), (3, 6, 6, 2))
    leaves, treedef = jax.tree.flatten(params)
    calls = discovery.discover(apply, leaves, treedef, x, 3)
    assert {c.kind for c in calls.values()} == {"conv", "dense"}
    zeros = {i: jnp.zeros(c.output.shape, c.output.dtype) for i, c in calls.items()}

    def forward(leaves, perturbations):
        recorder = layers.Recorder(perturbations=perturbations, fast=True)
        with layers.recording(recorder):
            return apply(jax.tree.unflatten(treedef, leaves), x)

    out, vjp_fn = jax.vjp(forward, leaves, zeros)
    for k in (1, 2, 5, 7):
        cols = jax.random.normal(jax.random.key(k), (k, *out.shape))
        got = jax.jit(lambda c: backprop.backpropagate_columns(vjp_fn, c, config=config))(cols)
        want = jax.jit(lambda c: [vjp_fn(column)[1] for column in c])(cols)
        for i in zeros:
            np.testing.assert_allclose(got[i], np.stack([w[i] for w in want]), **TOL)


def test_columns_stay_separate_where_vmap_batches_poorly():
    """Max-pooling outside the mask backward (overlapping windows) keeps XLA's
    ``select_and_scatter_add`` transpose, which ``vmap`` batches poorly on CPU: the columns
    then take one VJP call each (one transpose per column in the jaxpr), with the same
    values; non-overlapping pooling under the fast backward groups them."""
    from jaxopt_suite.curvature import backprop

    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    cols = jax.random.normal(jax.random.key(1), (3, 2, 4, 4, 1))
    _, vjp = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(1, 1)), x)
    vjp_fn = lambda ct: (None, {0: vjp(ct)[0]})
    assert backprop._batches_poorly(vjp_fn, cols[0])
    grouped = lambda c: backprop.backpropagate_columns(vjp_fn, c, groups=2)
    assert str(jax.make_jaxpr(grouped)(cols)).count("select_and_scatter_add") == 3
    want = np.stack([vjp(c)[0] for c in cols])
    np.testing.assert_allclose(jax.jit(grouped)(cols)[0], want, **TOL)
    with fastgrad.patched_pooling():
        _, fast = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    assert not backprop._batches_poorly(lambda ct: (None, fast(ct)), cols[0, :, :2, :2])
