"""curvature.value_and_grad against brute force (tests/reference.py): per-sample loops with
jax.grad, GGN diagonals from jax.jacrev of the model and jax.hessian of an independently
written loss."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_suite import curvature
from tests import reference
from tests.curvature.helpers import (
    MLP,
    TOL,
    assert_tree_close,
    check_all,
    huber_one,
    init,
    labels,
    linen_apply,
    rand,
)
from tests.reference import random_like

# --- models -----------------------------------------------------------------------------------


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.tanh(nn.Conv(4, (2, 2), strides=(2, 1), padding=((1, 0), (0, 1)), use_bias=False)(x))
        x = nn.avg_pool(x, (1, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Sequence(nn.Module):
    """Dense over a sequence axis (N, T, d), then per-position or pooled outputs."""

    per_position: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(4)(x))
        out = nn.Dense(3)(h)
        return out if self.per_position else out.sum(axis=1)


class Mixed(nn.Module):
    """A covered Dense, a LayerNorm (its own rule) and an uncovered hand-made parameter."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(4)(x))
        scale = self.param("scale", nn.initializers.ones, (4,))
        return nn.Dense(3)(jnp.tanh(h * scale))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_mlp_every_loss(loss, reduction):
    x = rand((4, 3))
    if loss == "cross_entropy":
        y = labels((4,), 3)
    elif loss == "mse":
        y = rand((4, 3), seed=5)
    else:
        y = jax.random.bernoulli(jax.random.key(5), 0.4, (4, 3)).astype(jnp.float32)
    model = MLP()
    check_all(linen_apply(model), init(model, x), x, y, loss, reduction, expect=["dense"])


def test_callable_loss_uses_hessian_square_root():
    x, y = rand((3, 3)), rand((3, 3), seed=7)
    model = MLP()
    params = init(model, x)
    check_all(linen_apply(model), params, x, y, huber_one, "mean")
    check_all(linen_apply(model), params, x, y, huber_one, "sum", generic=True)


@pytest.mark.slow
def test_cnn_with_pooling():
    x, y = rand((3, 6, 6, 2)), labels((3,), 3)
    model = CNN()
    check_all(
        linen_apply(model),
        init(model, x),
        x,
        y,
        "cross_entropy",
        expect=["conv", "dense"],
        generic=True,
    )


class ConvZoo(nn.Module):
    """Convolutions of every kind side by side (one model keeps the test cheap to compile)."""

    @nn.compact
    def __call__(self, x):  # x (N, 5, 5, 4)
        n = x.shape[0]
        seq, vol = x.reshape(n, 25, 4)[:, :7], x.reshape(n, 5, 5, 2, 2)
        branches = [
            nn.Conv(4, (3,), strides=(2,), padding="SAME")(seq),
            nn.Conv(4, (2,), kernel_dilation=(2,), padding="CIRCULAR")(seq),
            nn.Conv(4, (3,), input_dilation=(2,), padding=((2, 1),), use_bias=False)(seq),
            nn.Conv(6, (2,), feature_group_count=2, padding="VALID")(seq),
            nn.Conv(2, (2, 2, 2), strides=(1, 2, 1), padding="SAME")(vol),
            nn.Conv(4, (3, 2), kernel_dilation=(1, 2), strides=2, padding="SAME")(x),
        ]
        h = jnp.concatenate([jnp.tanh(b).reshape(n, -1) for b in branches], axis=1)
        return nn.Dense(2)(h)


@pytest.mark.slow
def test_conv_strides_padding_dilation_groups_1d_2d_3d():
    x, y = rand((2, 5, 5, 4)), labels((2,), 2)
    model = ConvZoo()
    check_all(linen_apply(model), init(model, x), x, y, "cross_entropy", expect=["conv", "dense"])


@pytest.mark.parametrize("per_position", [True, False])
def test_dense_over_sequence_axis(per_position):
    x = rand((3, 4, 2))
    y = labels((3, 4) if per_position else (3,), 3)
    model = Sequence(per_position=per_position)
    check_all(linen_apply(model), init(model, x), x, y, "cross_entropy", expect=["dense"])


def test_sequence_mse_sum():
    x, y = rand((2, 3, 2)), rand((2, 3, 3), seed=3)
    model = Sequence()
    check_all(linen_apply(model), init(model, x), x, y, "mse", "sum")


def test_mixed_covered_and_uncovered_layers():
    x, y = rand((4, 3)), labels((4,), 3)
    model = Mixed()
    params = init(model, x)
    kinds = curvature.coverage(linen_apply(model), params, x)
    assert kinds["LayerNorm_0"]["scale"] == "layernorm" and kinds["scale"] == "generic"
    assert kinds["Dense_0"]["kernel"] == "dense"
    check_all(linen_apply(model), params, x, y, "cross_entropy", generic=True, chunk_size=3)


def test_shared_layer_falls_back_to_generic():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return dense(jnp.tanh(dense(x)))

    x, y = rand((3, 3)), labels((3,), 3)
    model = Shared()
    params = init(model, x)
    assert set(jax.tree.leaves(curvature.coverage(linen_apply(model), params, x))) == {"generic"}
    check_all(linen_apply(model), params, x, y, "cross_entropy")


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs)
            self.linear = nnx.Linear(27, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.conv(x))
            return self.linear(h.reshape(h.shape[0], -1))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    state = random_like(state)
    apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x, y = rand((3, 5, 5, 2)), labels((3,), 3)
    check_all(apply_fn, state, x, y, "cross_entropy", expect=["conv", "dense"])


def test_hand_written_function():
    params = {"w": rand((3, 2)), "b": rand((2,), seed=4)}
    apply_fn = lambda p, x: jnp.sin(x @ p["w"]) + p["b"]
    x, y = rand((4, 3)), rand((4, 2), seed=6)
    assert set(jax.tree.leaves(curvature.coverage(apply_fn, params, x))) == {"generic"}
    check_all(apply_fn, params, x, y, "mse", generic=True)
    # chunks that don't divide the batch, without any summed statistic
    per_sample = ("grad_batch", "batch_l2", "diag_ggn_exact_batch")
    chunked = curvature.value_and_grad(apply_fn, loss="mse", quantities=per_sample, chunk_size=3)
    want = reference.quantities(apply_fn, params, x, y, "mse", "mean")
    _, _, got = jax.jit(chunked)(params, x, y)
    for name in per_sample:
        assert_tree_close(got[name], want[name])


# --- Monte Carlo --------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits", "callable"])
def test_mc_converges_to_exact(loss):
    x = rand((3, 3))
    y = {
        "cross_entropy": labels((3,), 3),
        "mse": rand((3, 3), seed=5),
        "bce_with_logits": jnp.ones((3, 3)) * 0.5,
        "callable": rand((3, 3), seed=5),
    }[loss]
    model = MLP()
    params = init(model, x)
    fn = curvature.value_and_grad(
        linen_apply(model),
        loss=huber_one if loss == "callable" else loss,
        quantities=("diag_ggn_exact", "diag_ggn_mc", "diag_ggn_exact_batch", "diag_ggn_mc_batch"),
        mc_samples=20000,
    )
    _, _, extras = jax.jit(fn)(params, x, y, key=jax.random.key(0))
    for exact, mc in [
        ("diag_ggn_exact", "diag_ggn_mc"),
        ("diag_ggn_exact_batch", "diag_ggn_mc_batch"),
    ]:
        for e, m in zip(jax.tree.leaves(extras[exact]), jax.tree.leaves(extras[mc]), strict=True):
            scale = float(jnp.max(jnp.abs(e))) + 1e-12
            np.testing.assert_allclose(m / scale, e / scale, atol=0.05)


@pytest.mark.slow
def test_mc_structured_equals_generic_with_same_key():
    x, y = rand((4, 6, 6, 2)), labels((4,), 3)
    model = CNN()
    params = init(model, x)
    out = []
    for structured in (True, False):
        fn = curvature.value_and_grad(
            linen_apply(model),
            loss="cross_entropy",
            quantities=("diag_ggn_mc", "diag_ggn_mc_batch"),
            mc_samples=3,
            structured=structured,
        )
        out.append(jax.jit(fn)(params, x, y, key=jax.random.key(4))[2])
    assert_tree_close(out[0], out[1])


# --- the contract -------------------------------------------------------------------------


def test_grads_equal_jax_grad_and_jit_does_not_retrace():
    x, y = rand((4, 3)), labels((4,), 3)
    model = MLP()
    params = init(model, x)
    traces = []

    def apply_fn(p, x):
        traces.append(1)
        return model.apply({"params": p}, x)

    fn = jax.jit(curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=("batch_l2",)))
    value, grads, extras = fn(params, x, y)
    ref_loss = lambda p: reference.batch_loss("cross_entropy")(model.apply({"params": p}, x), y)
    want_value, want_grads = jax.value_and_grad(ref_loss)(params)
    np.testing.assert_allclose(value, want_value, **TOL)
    assert_tree_close(grads, want_grads)
    assert extras["batch_l2"]["Dense_0"]["kernel"].shape == (4,)
    count = len(traces)
    fn(params, x + 1.0, y)
    assert len(traces) == count


def test_bad_input_errors_name_the_argument():
    model = MLP()
    x, y = rand((4, 3)), labels((4,), 3)
    params = init(model, x)
    apply_fn = linen_apply(model)
    with pytest.raises(ValueError, match=r"unknown quantities.*valid names: grad_batch"):
        curvature.value_and_grad(apply_fn, loss="mse", quantities=("diag_h_typo",))
    with pytest.raises(ValueError, match=r"unknown loss 'nll'.*cross_entropy"):
        curvature.value_and_grad(apply_fn, loss="nll")
    with pytest.raises(ValueError, match="reduction"):
        curvature.value_and_grad(apply_fn, loss="mse", reduction="none")
    with pytest.raises(ValueError, match="mc_samples"):
        curvature.value_and_grad(apply_fn, loss="mse", mc_samples=0)
    with pytest.raises(TypeError, match="quantities"):
        curvature.value_and_grad(apply_fn, loss="mse", quantities="batch_l2")
    fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=("diag_ggn_mc",))
    with pytest.raises(ValueError, match="key="):
        fn(params, x, y)
    fn = curvature.value_and_grad(apply_fn, loss="cross_entropy")
    with pytest.raises(ValueError, match="integer class labels"):
        fn(params, x, x)
    with pytest.raises(ValueError, match="targets of the outputs' shape"):
        curvature.value_and_grad(apply_fn, loss="mse")(params, x, y)
    with pytest.raises(ValueError, match="per-sample"):
        curvature.value_and_grad(apply_fn, loss=lambda o, t: o - t)(params, x, x)


# --- the conv rule on its own: chunks of samples ------------------------------------------


def _conv_kernel_brute(shape, kshape, cfg, k):
    """A random input and K output cotangents of a convolution (channel-last), and the
    per-(column, sample) kernel gradients from ``jax.vjp`` of the convolution on one sample.

    Returns ``(x, delta, output shape, gradients (K, N, *kernel shape))``."""
    x, w = rand(shape, seed=3), rand(kshape, seed=4)
    spec = ("NWC", "WIO", "NWC") if len(shape) == 3 else ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            cfg.window_strides,
            cfg.padding,
            cfg.lhs_dilation,
            cfg.rhs_dilation,
            spec,
            cfg.feature_group_count,
        )

    out = jax.eval_shape(conv, x, w)
    delta = rand((k, *out.shape), seed=5)

    def one(xi, di):  # one sample, one column: the kernel's gradient
        return jax.vjp(conv, xi[None], w)[1](di[None])[1]

    return x, delta, out, np.asarray(jax.jit(jax.vmap(jax.vmap(one), (None, 0)))(x, delta))


def test_conv_rule_over_sample_chunks_matches_per_sample_vjp(monkeypatch):
    """``rules.conv.conv_kernel`` reduces chunks of samples in a loop (here chunks of 2 of 3
    samples: a scan or map plus a zero-padded last chunk): every statistic against
    per-(column, sample) kernel gradients from ``jax.vjp`` of the convolution on one sample."""
    from jaxopt_suite.curvature import EngineConfig, rules
    from jaxopt_suite.curvature.layers import ConvConfig, LayerCall

    k, n = 2, 3
    cases = [  # (input shape, kernel shape, ConvConfig)
        ((n, 7, 4), (2, 2, 6), ConvConfig((2,), (1,), ((1, 0),), (2,), (1,), 2)),
    ]
    for shape, kshape, cfg in cases:
        x, delta, out, brute = _conv_kernel_brute(shape, kshape, cfg, k)
        want = {
            "individual": brute[0],
            "individual_sq_norm": (brute[0] ** 2).reshape(n, -1).sum(1),
            "sum_sq": (brute**2).sum((0, 1)),
            "individual_sum_sq": (brute**2).sum(0),
        }
        call = LayerCall("conv", 0, None, out, cfg)
        options = EngineConfig(sample_chunk_bytes=2 * int(np.prod(kshape)) * k * 4)

        @jax.jit
        def stats(x, delta, call=call, cfg=cfg, options=options):
            patches = rules.prepare(call, x)
            return {
                s: rules.conv.conv_kernel(s, patches, delta, cfg, options) for s in rules.STATISTICS
            }

        for statistic, got in stats(x, delta).items():
            np.testing.assert_allclose(got, want[statistic], **TOL, err_msg=statistic)


def test_conv_rule_per_sample_sum_sq_matches_per_sample_vjp(monkeypatch):
    """A conv's multi-column ``sum_sq`` as one 2-D product per sample in a loop
    (``rules.conv._conv_kernel_sum_sq_per_sample``, taken by the engine for products of at least
    ``EngineConfig.per_sample_product`` entries, lowered here so tiny shapes take it) against
    per-(column, sample) kernel gradients; a grouped convolution keeps the other path."""
    from jaxopt_suite.curvature import EngineConfig, rules
    from jaxopt_suite.curvature.layers import ConvConfig, LayerCall
    from jaxopt_suite.curvature.rules import conv

    options = EngineConfig(per_sample_product=0)
    taken = []
    per_sample = conv._conv_kernel_sum_sq_per_sample
    monkeypatch.setattr(
        conv,
        "_conv_kernel_sum_sq_per_sample",
        lambda *a: taken.append(True) or per_sample(*a),
    )
    cases = [  # (input shape, kernel shape, ConvConfig, taken by the per-sample path)
        (
            (3, 6, 5, 3),
            (3, 2, 3, 4),
            ConvConfig((3, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1),
            True,
        ),
        ((2, 9, 2), (3, 2, 5), ConvConfig((3,), (2,), ((1, 2),), (1,), (2,), 1), True),
        ((3, 7, 4), (2, 2, 6), ConvConfig((2,), (1,), ((1, 0),), (2,), (1,), 2), False),
    ]
    for shape, kshape, cfg, expect_taken in cases:
        taken.clear()
        x, delta, out, brute = _conv_kernel_brute(shape, kshape, cfg, k=3)
        call = LayerCall("conv", 0, None, out, cfg)

        @jax.jit
        def sum_sq(x, delta, call=call, cfg=cfg):
            return rules.conv.conv_kernel("sum_sq", rules.prepare(call, x), delta, cfg, options)

        np.testing.assert_allclose(sum_sq(x, delta), (brute**2).sum((0, 1)), **TOL)
        assert bool(taken) == expect_taken


def test_conv_kernel_gradient_matches_summed_per_sample_vjp():
    """The engine's conv kernel gradient from its patches (``rules.conv.conv_kernel_gradient``, one
    2-D product over samples and positions) against the per-sample kernel gradients of
    ``jax.vjp`` of the convolution, summed; feature groups are refused."""
    from jaxopt_suite.curvature import rules
    from jaxopt_suite.curvature.layers import ConvConfig, LayerCall

    cases = [  # (input shape, kernel shape, ConvConfig)
        (
            (3, 6, 5, 3),
            (3, 2, 3, 4),
            ConvConfig((3, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1),
        ),
        ((2, 9, 2), (3, 2, 5), ConvConfig((3,), (2,), ((1, 2),), (1,), (2,), 1)),
        ((2, 5, 3), (2, 3, 2), ConvConfig((2,), (1,), ((2, 1),), (2,), (1,), 1)),
    ]
    for shape, kshape, cfg in cases:
        x, delta, out, brute = _conv_kernel_brute(shape, kshape, cfg, k=1)
        call = LayerCall("conv", 0, None, out, cfg)

        @jax.jit
        def grad(x, delta, call=call, cfg=cfg):
            return rules.conv.conv_kernel_gradient(rules.prepare(call, x), delta, cfg)

        np.testing.assert_allclose(grad(x, delta[0]), brute[0].sum(0), **TOL)
    grouped = ConvConfig((2,), (1,), ((0, 0),), (1,), (1,), 2)
    with pytest.raises(ValueError, match="feature groups"):
        rules.conv.conv_kernel_gradient(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 4)), grouped)
