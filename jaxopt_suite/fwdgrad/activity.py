r"""Activity-perturbed forward gradients: random tangents on the layers' outputs, not weights.

For a model built from flax ``Dense`` / ``Conv`` layers (linen or nnx, found as the curvature
engine finds them: :mod:`jaxopt_suite.curvature.layers`), each layer :math:`l` computes
:math:`z_l = W_l\, x_l` (plus a bias). A per-sample loss :math:`\ell_n` and the objective
:math:`L = \frac1N \sum_n \ell_n` give

.. math::

  \nabla_{W_l} L = \frac1N \sum_n J_{l,n}^\top g_{l,n}, \qquad
  g_{l,n} = \nabla_{z_{l,n}} \ell_n,

with :math:`J_{l,n}` the Jacobian of :math:`z_{l,n}` with respect to the layer's weights
(Dense: :math:`J_{l,n}^\top g = x_{l,n} \otimes g`). Ren et al. ("Scaling forward gradient with
local losses", ICLR 2023) replace :math:`g_{l,n}` by a forward-gradient estimate on the
activations: one random tangent :math:`u_n` on all perturbed pre-activations of sample
:math:`n` (:math:`\mathbb{E}[u_n u_n^\top] = I`), one ``jax.jvp`` for the per-sample
directional derivatives :math:`d_n = g_n \cdot u_n`, and :math:`\hat g_n = d_n u_n`. The
weight estimate :math:`\frac1N \sum_n J_{l,n}^\top \hat g_{l,n}` is a product local to the
layer (its input times the estimate); nothing is propagated backwards through the network.
The variance grows with the number of activations :math:`M` of a sample, not with the number
of weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import jaxopt_suite.curvature  # noqa: F401  (registers the Dense and Conv interceptions)
from jaxopt_suite.curvature import discovery, layers
from jaxopt_suite.fwdgrad.directions import DISTRIBUTIONS, _check_choice, random_direction
from jaxopt_suite.fwdgrad.estimator import _check_num_directions

#: Layer kinds whose weights the activity estimate covers.
ACTIVITY_KINDS = ("dense", "conv")


def value_and_activity_grad(
    apply_fn: Callable,
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    num_directions: int = 1,
    distribution: str = "normal",
    has_aux: bool = False,
) -> Callable:
    r"""The mean loss and its activity-perturbed forward-gradient estimate.

    .. math::

      \hat G_l = \frac1N \sum_n J_{l,n}^\top \Big(\frac1K \sum_k (g_n \cdot u_{n,k})\,
      u_{l,n,k}\Big), \qquad \mathbb{E}[\hat G_l] = \nabla_{W_l} L

    where :math:`u_{n,k} \in \mathbb{R}^M` stacks the tangents of sample :math:`n` on the
    outputs of every Dense/Conv layer (:math:`M` activations in all), :math:`g_n` stacks the
    matching :math:`\nabla_z \ell_n`, and :math:`J_n` is block-diagonal over the layers (the
    Jacobian of the pre-activations with respect to kernel and bias). With independent samples
    and directions, the total squared error over all estimated leaves is

    .. math::

      \mathbb{E}\|\hat G - \nabla L\|^2 = \frac{1}{K N^2} \sum_n \Big(
        \|g_n\|^2 \|J_n\|_F^2 + \|J_n^\top g_n\|^2 - 2 c \sum_i g_{n,i}^2 (J_n J_n^\top)_{ii}
      \Big)

    with :math:`c = 0` for normal tangents and :math:`c = 1` for Rademacher ones (from
    :math:`\mathbb{E}[(g\cdot u)^2 u^\top A u] = \|g\|^2 \operatorname{tr} A + 2 g^\top A g
    - 2c \sum_i g_i^2 A_{ii}`). For a Dense layer with bias, :math:`(J J^\top)_{ii} =
    \|x\|^2 + 1`, so with only Dense layers Rademacher tangents give :math:`\|g_n\|^2
    \|J_n\|_F^2 - \|J_n^\top g_n\|^2`.

    The per-sample directional derivatives come from one ``jax.jvp`` of the vector of
    per-sample losses (K directions: ``vmap`` over the tangents, the primal pass shared). The
    estimate needs ``loss_fn``'s sample :math:`n` to depend on sample :math:`n` only (no batch
    statistics such as training-mode BatchNorm): otherwise :math:`d_n` misses the other samples'
    dependence and the estimate is biased.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (``(outputs, aux)`` with ``has_aux``);
        every parameter leaf must be the kernel or bias of exactly one flax Dense/Conv call
        whose leading axis is the batch axis.
      loss_fn: ``loss_fn(outputs, targets) -> per-sample losses`` of shape ``(N,)``.
      num_directions: K >= 1 tangents per sample, averaged (variance / K).
      distribution: ``"normal"`` or ``"rademacher"``.
      has_aux: ``apply_fn`` returns ``(outputs, aux)``; ``aux`` is returned with the value.

    Returns:
      ``g(key, params, inputs, targets) -> (value, estimate)`` (``((value, aux), estimate)``
      with ``has_aux``): ``value`` the mean loss, ``estimate`` shaped like ``params``.

    Raises:
      ValueError: (at trace time) a parameter leaf that no usable Dense/Conv call owns, or
        per-sample losses of the wrong shape.

    Example:
      >>> import flax.linen as nn, optax
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((4, 2)))
      >>> loss = optax.softmax_cross_entropy_with_integer_labels
      >>> g = value_and_activity_grad(model.apply, loss)
      >>> value, grads = g(jax.random.key(1), params, jnp.ones((4, 2)), jnp.zeros(4, int))
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    num_directions = _check_num_directions(num_directions)
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    def estimate(key: jax.Array, params: Any, inputs: Any, targets: Any):
        leaves, treedef = jax.tree.flatten(params)
        batch = _batch_size(inputs)
        outputs_of = (lambda p, x: apply_fn(p, x)[0]) if has_aux else apply_fn
        calls = discovery.discover(outputs_of, leaves, treedef, inputs, batch, ACTIVITY_KINDS)
        _check_owned(leaves, treedef, calls)

        def forward(perturbations):
            recorder = layers.Recorder(perturbations=perturbations)
            with layers.recording(recorder):
                found = apply_fn(jax.tree.unflatten(treedef, leaves), inputs)
            outputs, aux = found if has_aux else (found, None)
            losses = loss_fn(outputs, targets)
            if jnp.shape(losses) != (batch,) or not jnp.issubdtype(
                jnp.result_type(losses), jnp.floating
            ):
                raise ValueError(
                    f"loss_fn must return per-sample floating losses of shape ({batch},); got "
                    f"shape {jnp.shape(losses)} and dtype {jnp.result_type(losses)}"
                )
            return losses, (recorder.inputs, aux)

        zeros = {i: jnp.zeros(c.output.shape, c.output.dtype) for i, c in calls.items()}
        keys = jax.random.split(key, num_directions)
        tangents = jax.vmap(lambda k: random_direction(k, zeros, distribution))(keys)
        jvp = lambda u: jax.jvp(forward, (zeros,), (u,), has_aux=True)
        losses, dots, (xs, aux) = jax.vmap(jvp, out_axes=(None, 0, None))(tangents)
        grads: list = [None] * len(leaves)
        for i, call in calls.items():
            u = tangents[i]
            weights = dots.reshape(dots.shape + (1,) * (u.ndim - 2)).astype(u.dtype)
            g_z = jnp.sum(weights * u, axis=0) / (num_directions * batch)
            kernel = leaves[call.kernel]
            grads[call.kernel] = _kernel_product(call, xs[i], g_z, kernel).astype(kernel.dtype)
            if call.bias is not None:
                bias = leaves[call.bias]
                total = jnp.sum(g_z.reshape(-1, g_z.shape[-1]), axis=0)
                grads[call.bias] = total.reshape(bias.shape).astype(bias.dtype)
        value = jnp.mean(losses)
        return ((value, aux) if has_aux else value), jax.tree.unflatten(treedef, grads)

    return estimate


def activity_grad(
    apply_fn: Callable,
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    num_directions: int = 1,
    distribution: str = "normal",
) -> Callable:
    r"""Like :func:`value_and_activity_grad`, without the value: ``g(key, params, inputs,
    targets) -> estimate`` of :math:`\nabla_\theta \frac1N \sum_n \ell_n`.

    Example:
      >>> import flax.linen as nn, optax
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((4, 2)))
      >>> g = activity_grad(model.apply, optax.softmax_cross_entropy_with_integer_labels)
      >>> g(jax.random.key(1), params, jnp.ones((4, 2)), jnp.zeros(4, int))["params"]["bias"].shape
      (3,)
    """
    value_and_grad = value_and_activity_grad(
        apply_fn, loss_fn, num_directions=num_directions, distribution=distribution
    )
    return lambda key, params, inputs, targets: value_and_grad(key, params, inputs, targets)[1]


def _batch_size(inputs: Any) -> int:
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(inputs) if jnp.ndim(x) >= 1}
    if len(sizes) != 1:
        raise ValueError(
            "inputs must be arrays that share a leading batch axis; got leading sizes "
            f"{sorted(sizes)}"
        )
    return sizes.pop()


def _check_owned(leaves: list, treedef: Any, calls: dict[int, layers.LayerCall]) -> None:
    owned = {leaf for c in calls.values() for leaf in (c.kernel, c.bias) if leaf is not None}
    missing = [i for i in range(len(leaves)) if i not in owned]
    if missing:
        tree = jax.tree.unflatten(treedef, leaves)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        raise ValueError(
            "params: the activity estimate covers only the kernels and biases of flax "
            f"Dense/Conv calls ({', '.join(ACTIVITY_KINDS)}) that own their leaves and whose "
            "leading axis is the batch axis; no such call owns "
            + ", ".join(paths[i] for i in missing)
        )


def _kernel_product(
    call: layers.LayerCall, x: jax.Array, g_z: jax.Array, kernel: jax.Array
) -> jax.Array:
    """:math:`\\sum_n J_n^\\top g_{z,n}` for the kernel: the layer's own linear map
    transposed with respect to its weights (Dense: ``x^T g_z``), local to the layer."""
    if call.conv is None:
        x2 = x.reshape(-1, x.shape[-1])
        return x2.T.astype(g_z.dtype) @ g_z.reshape(-1, g_z.shape[-1])
    config = call.conv
    nd = len(config.kernel_spatial)
    spatial = tuple(range(1, nd + 1))
    numbers = lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1, *spatial),
        rhs_spec=(nd + 1, nd, *range(nd)),
        out_spec=(0, nd + 1, *spatial),
    )

    def conv(w):
        return lax.conv_general_dilated(
            x,
            w,
            config.window_strides,
            config.padding,
            config.lhs_dilation,
            config.rhs_dilation,
            numbers,
            config.feature_group_count,
        )

    _, transpose = jax.vjp(conv, kernel)
    return transpose(g_z.astype(kernel.dtype))[0]
