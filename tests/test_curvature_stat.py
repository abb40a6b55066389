"""The conv kernel's multi-column ``sum_sq`` as one 2-D product per sample in a loop
(``rules._conv_kernel_sum_sq_per_sample``), against per-(column, sample) gradients from
``jax.vjp`` of the convolution on one sample. The engine takes that path only for products
of at least ``rules._PER_SAMPLE_PRODUCT`` entries (the BackPACK CNN's second convolution);
the threshold is lowered here so that tiny shapes exercise it."""

import jax
import numpy as np

from jaxopt_suite.curvature import rules
from jaxopt_suite.curvature.layers import ConvConfig, LayerCall

TOL = dict(atol=1e-5, rtol=1e-5)


def rand(shape, seed):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


CASES = [  # (input shape, kernel shape, ConvConfig, taken by the per-sample path)
    (
        (3, 6, 5, 3),
        (3, 2, 3, 4),
        ConvConfig((3, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1),
        True,
    ),
    ((2, 9, 2), (3, 2, 5), ConvConfig((3,), (2,), ((1, 2),), (1,), (2,), 1), True),
    ((3, 7, 4), (2, 2, 6), ConvConfig((2,), (1,), ((1, 0),), (2,), (1,), 2), False),  # groups
]


def test_per_sample_sum_sq_matches_vjp(monkeypatch):
    monkeypatch.setattr(rules, "_PER_SAMPLE_PRODUCT", 0)
    taken = []
    per_sample = rules._conv_kernel_sum_sq_per_sample
    monkeypatch.setattr(
        rules,
        "_conv_kernel_sum_sq_per_sample",
        lambda *a: taken.append(True) or per_sample(*a),
    )
    k = 3
    for shape, kshape, cfg, expect_taken in CASES:
        taken.clear()
        x, w = rand(shape, seed=3), rand(kshape, seed=4)
        spec = ("NWC", "WIO", "NWC") if len(shape) == 3 else ("NHWC", "HWIO", "NHWC")

        def conv(x, w, cfg=cfg, spec=spec):
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

        def one(xi, di, w=w, conv=conv):  # one sample, one column: the kernel's gradient
            return jax.vjp(conv, xi[None], w)[1](di[None])[1]

        brute = np.asarray(jax.jit(jax.vmap(jax.vmap(one), (None, 0)))(x, delta))  # (K, N, *k)
        call = LayerCall("conv", 0, None, out, cfg)

        @jax.jit
        def sum_sq(x, delta, call=call, cfg=cfg):
            return rules.conv_kernel("sum_sq", rules.prepare(call, x), delta, cfg)

        np.testing.assert_allclose(sum_sq(x, delta), (brute**2).sum((0, 1)), **TOL)
        assert bool(taken) == expect_taken
