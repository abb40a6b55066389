"""Callable per-sample losses beyond diagonal Hessians, and their bad-target error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxopt_suite import curvature
from tests.curvature.helpers import MLP, check_all, init, linen_apply, rand


def coupled_one(out, y):
    """A convex loss whose output Hessian is not diagonal: 2 I + s'(z) a a^T."""
    r = out - y
    return jnp.sum(r**2) + jax.nn.softplus(r[0] + 2.0 * r[1] - r[2])


def test_callable_loss_with_a_non_diagonal_hessian():
    x, y = rand((3, 3)), rand((3, 3), seed=7)
    model = MLP()
    hess = jax.hessian(coupled_one)(jnp.ones(3), jnp.zeros(3))
    assert abs(float(hess[0, 1])) > 0.1  # the eigendecomposition root is exercised
    check_all(linen_apply(model), init(model, x), x, y, coupled_one, "mean", generic=True)


def test_callable_loss_with_targets_that_do_not_fit_names_them():
    x = rand((3, 3))
    model = MLP()
    fn = curvature.value_and_grad(linen_apply(model), loss=coupled_one, quantities=("batch_l2",))
    with pytest.raises(ValueError, match=r"target shape \(5,\).*do the targets fit"):
        fn(init(model, x), x, jnp.ones((3, 5)))
