r"""Diagonal preconditioning by a curvature estimate, fed by :mod:`jaxopt_suite.curvature`.

:func:`scale_by_diagonal_curvature` divides the updates by a curvature diagonal plus damping,

.. math::
   u \leftarrow \frac{u}{D + \lambda},

where :math:`D` (a pytree like the updates, e.g. ``extras["diag_ggn_mc"]``) arrives as the
keyword argument ``curvature`` of ``update``. :func:`diag_ggn_sgd` is BackPACK's example
optimizer, :math:`\theta \leftarrow \theta - \alpha\, g / (\mathrm{diag\_ggn\_mc} + \lambda)`,
and ``jaxopt_suite.harness.train.curvature_gradient`` is the training step's gradient function
that computes the gradient and the curvature in one pass and hands both to the transformation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite._src.checks import check_floating
from jaxopt_suite._typing import PyTree


class ScaleByDiagonalCurvatureState(NamedTuple):
    """Stateless: the curvature comes with every ``update`` call."""


def scale_by_diagonal_curvature(
    damping: float | jax.Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Divides the updates by ``curvature + damping`` elementwise.

    .. math::
       u_i \leftarrow \frac{u_i}{D_i + \lambda}

    One division per entry, in the updates' dtype (bfloat16 stays bfloat16: nothing is
    accumulated, so nothing is widened; the engine already sums the diagonal in float32).

    Args:
      damping: :math:`\lambda > 0`, added to the curvature: a number or an array (checked when
        concrete), or a traced array, e.g. under ``optax.inject_hyperparams`` (not checked).

    Returns:
      An optax transformation whose ``update(updates, state, params=None, *, curvature)``
      requires ``curvature``, a pytree with the structure and shapes of ``updates`` (other extra
      keyword arguments are ignored). A non-finite curvature entry gives a non-finite update
      entry, which :func:`jaxopt_suite.harness.train.make_step` keeps out of the parameters.
      A parameter, update or curvature leaf that is not floating (integer parameters) is a
      ``TypeError`` naming the leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_diagonal_curvature(damping=1.0)
      >>> g = {"w": jnp.array([2.0, 3.0])}
      >>> u, _ = tx.update(g, tx.init(g), curvature={"w": jnp.array([1.0, 2.0])})
      >>> u["w"]
      Array([1., 1.], dtype=float32)
    """
    if not isinstance(damping, jax.core.Tracer) and not np.all(np.asarray(damping) > 0):
        raise ValueError(f"damping must be positive (it keeps the division finite); got {damping}")

    def init_fn(params: PyTree) -> ScaleByDiagonalCurvatureState:
        check_floating(params, "params", "scale_by_diagonal_curvature")
        return ScaleByDiagonalCurvatureState()

    def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
        del params, extra_args
        if curvature is None:
            raise TypeError(
                "scale_by_diagonal_curvature needs the keyword argument curvature= (a pytree "
                "like the updates, e.g. extras['diag_ggn_mc'] from curvature.value_and_grad)"
            )
        check_floating(updates, "updates", "scale_by_diagonal_curvature")
        check_floating(curvature, "curvature", "scale_by_diagonal_curvature")
        if jax.tree.structure(curvature) != jax.tree.structure(updates):
            raise ValueError(
                "curvature must have the structure of the updates; got "
                f"{jax.tree.structure(curvature)} for updates {jax.tree.structure(updates)}"
            )
        pairs = zip(
            jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(curvature), strict=True
        )
        for (path, u), d in pairs:
            if jnp.shape(d) != jnp.shape(u):
                raise ValueError(
                    f"curvature must have the shapes of the updates; at "
                    f"{jax.tree_util.keystr(path)} got {jnp.shape(d)} for an update of shape "
                    f"{jnp.shape(u)} (a per-sample quantity such as diag_ggn_exact_batch? pass "
                    "one shaped like the parameters)"
                )
        scaled = jax.tree.map(
            lambda u, d: (u / (d + jnp.asarray(damping, d.dtype))).astype(u.dtype),
            updates,
            curvature,
        )
        return scaled, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diag_ggn_sgd(
    learning_rate: optax.ScalarOrSchedule, damping: float | jax.Array = 1.0
) -> optax.GradientTransformationExtraArgs:
    r"""SGD preconditioned by a GGN diagonal (BackPACK's DiagGGN example).

    .. math::
       \theta \leftarrow \theta - \alpha \frac{g}{\mathrm{diag}(G) + \lambda}

    Args:
      learning_rate: :math:`\alpha`, a scalar or a schedule.
      damping: :math:`\lambda > 0`.

    Returns:
      ``optax.chain(scale_by_diagonal_curvature(damping), scale_by_learning_rate(lr))``; pass
      the diagonal as ``update(..., curvature=extras["diag_ggn_mc"])``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> tx = diag_ggn_sgd(0.5, damping=1.0)
      >>> p = {"w": jnp.array([1.0])}
      >>> u, _ = tx.update(p, tx.init(p), p, curvature={"w": jnp.array([1.0])})
      >>> u["w"]
      Array([-0.25], dtype=float32)
    """
    return optax.chain(
        scale_by_diagonal_curvature(damping), optax.scale_by_learning_rate(learning_rate)
    )
