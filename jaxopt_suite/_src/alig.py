r"""AliG: the step size from the loss value (Berrada, Zisserman and Kumar, ICML 2020).

AliG ("Adaptive Learning-rates for Interpolation with Gradients") assumes the model can drive
the training loss to (nearly) zero. It then takes the largest step that, on the linearised
loss, would reach the lower bound ``f_min``, clipped at ``max_lr``:

.. math::

  \gamma_t = \min\left(\frac{\max(\ell_t - f_{\min}, 0)}{\|g_t\|^2 + \epsilon},
  \ \eta_{\max}\right),

where :math:`\ell_t` is the mini-batch loss, :math:`g_t` its gradient and :math:`\|g_t\|^2`
the squared norm over *all* parameters at once.

* :func:`scale_by_alig` is the building block: it multiplies its input by :math:`\gamma_t`.
* :func:`alig` is the complete optimizer (sign, both momentum forms, projection) and reproduces
  the reference PyTorch optimizer step for step.
* :func:`project_l2_ball` projects a whole parameter tree onto an L2 ball, the constraint the
  reference uses instead of weight decay.

Both transformations need the loss as the keyword argument ``value=`` of ``update``
(``train.backprop`` passes it). A step whose loss or gradient is not finite is skipped: the
update is zero and the state is left as it was, except for a counter of skipped steps.

Precision: with bfloat16 (or float16) parameters and gradients, the squared gradient norm is
accumulated and the step size :math:`\gamma_t` computed in float32 (the state's step sizes are
float32); each update :math:`\gamma_t g_t` (and the momentum combination) is formed in float32
and cast back to its leaf's dtype, so updates and the momentum buffer keep the parameters'
dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite._src.checks import check_floating
from jaxopt_suite._typing import PyTree

Scalar = float | jax.Array

_VALUE_HELP = (
    "AliG needs the loss value as `value=`: call `update(updates, state, params, value=loss)` "
    "(jaxopt_suite.harness.train.backprop does this), or use `jax.value_and_grad` to get it."
)


class ScaleByAligState(NamedTuple):
    """State of :func:`scale_by_alig` (and the step-size part of :func:`alig`).

    Attributes:
      step_size: :math:`\\gamma_t` of the last step taken (after clipping at ``max_lr``);
        0 before the first step.
      unclipped_step_size: :math:`\\max(\\ell_t - f_{\\min}, 0) / (\\|g_t\\|^2 + \\epsilon)` of
        the last step taken, for logging how often ``max_lr`` binds.
      skipped: number of steps skipped because the loss value or the gradient was not finite.
    """

    step_size: jax.Array
    unclipped_step_size: jax.Array
    skipped: jax.Array


class AligState(NamedTuple):
    """State of :func:`alig`.

    Attributes:
      alig: the step-size state (:class:`ScaleByAligState`).
      velocity: the momentum buffer :math:`v` (shaped like the parameters), or
        ``optax.EmptyState()`` when ``momentum`` is the Python number 0.
    """

    alig: ScaleByAligState
    velocity: PyTree


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_scalar(name: str, value: Any, valid: Callable[[float], bool], accepted: str) -> None:
    """Raises a ValueError naming ``name`` when a concrete hyper-parameter is out of range.

    Traced values (``optax.inject_hyperparams`` under ``jit``) cannot be checked and pass.
    """
    if _is_traced(value):
        return
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if array.shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {array.shape}")
    if not valid(float(array)):
        raise ValueError(f"{name} must be {accepted}, got {float(array)}")


def _check_hyperparams(max_lr: Scalar | None, eps: Scalar, f_min: Scalar) -> None:
    if max_lr is not None:
        _check_scalar("max_lr", max_lr, lambda x: x > 0, "positive (or None for no clipping)")
    _check_scalar("eps", eps, lambda x: x >= 0, "non-negative")
    _check_scalar("f_min", f_min, np.isfinite, "a finite number")


def _loss_value(value: Any) -> jax.Array:
    if value is None:
        raise TypeError(_VALUE_HELP)
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(
            f"value must be the scalar loss of the mini-batch, got shape {value.shape}; "
            "reduce per-sample losses (e.g. with .mean()) first"
        )
    return value


def global_sq_norm(tree: PyTree) -> jax.Array:
    r"""Squared L2 norm of a whole pytree, :math:`\sum_{\text{leaves}} \sum_i x_i^2`.

    Low-precision leaves (bfloat16, float16) are accumulated in float32.

    Args:
      tree: a pytree of arrays.

    Returns:
      A scalar of at least float32 precision (0 for an empty tree).
    """
    sums = [
        jnp.sum(jnp.square(x.astype(jnp.promote_types(jnp.result_type(x), jnp.float32))))
        for x in jax.tree.leaves(tree)
    ]
    return sum(sums[1:], sums[0]) if sums else jnp.zeros((), jnp.float32)


def alig_step_size(
    value: jax.Array,
    grad_sq_norm: jax.Array,
    max_lr: Scalar | None = None,
    eps: Scalar = 1e-5,
    f_min: Scalar = 0.0,
) -> tuple[jax.Array, jax.Array]:
    r"""AliG's step size from the loss value and the gradient's squared norm.

    .. math::

      \tilde\gamma = \frac{\max(\ell - f_{\min}, 0)}{\|g\|^2 + \epsilon}, \qquad
      \gamma = \min(\tilde\gamma, \eta_{\max})

    The gap is clamped at 0 so that a loss below ``f_min`` gives no step rather than a step
    uphill; for ``value >= f_min`` (always, with the default ``f_min = 0`` and a non-negative
    loss) this is exactly the reference formula.

    Args:
      value: the scalar loss :math:`\ell`.
      grad_sq_norm: :math:`\|g\|^2`, e.g. from :func:`global_sq_norm`.
      max_lr: the clip :math:`\eta_{\max}`, or None for no clipping.
      eps: :math:`\epsilon`, keeps the step finite when the gradient vanishes.
      f_min: a lower bound on the loss.

    Returns:
      ``(step_size, unclipped_step_size)``, scalars in ``grad_sq_norm``'s dtype.
    """
    dtype = jnp.result_type(grad_sq_norm, jnp.float32)
    gap = jnp.maximum(jnp.asarray(value, dtype) - jnp.asarray(f_min, dtype), 0)
    unclipped = gap / (grad_sq_norm.astype(dtype) + jnp.asarray(eps, dtype))
    clipped = unclipped if max_lr is None else jnp.minimum(unclipped, jnp.asarray(max_lr, dtype))
    return clipped, unclipped


def _step_size_state(dtype=jnp.float32) -> ScaleByAligState:
    return ScaleByAligState(
        step_size=jnp.zeros((), dtype),
        unclipped_step_size=jnp.zeros((), dtype),
        skipped=jnp.zeros((), jnp.int32),
    )


def _guard(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _scale_like(scale: jax.Array, tree: PyTree) -> PyTree:
    """``scale * tree`` leaf by leaf, each leaf keeping its dtype."""
    return jax.tree.map(lambda x: (scale * x).astype(x.dtype), tree)


def _alig_step(
    updates: PyTree, state: ScaleByAligState, value: Any, max_lr, eps, f_min
) -> tuple[jax.Array, jax.Array, ScaleByAligState]:
    """Step size, whether the step is finite, and the new step-size state."""
    value = _loss_value(value)
    sq = global_sq_norm(updates)
    step, unclipped = alig_step_size(value, sq, max_lr, eps, f_min)
    ok = jnp.isfinite(value) & jnp.isfinite(sq) & jnp.isfinite(step)
    new_state = ScaleByAligState(
        step_size=jnp.where(ok, step, state.step_size).astype(state.step_size.dtype),
        unclipped_step_size=jnp.where(ok, unclipped, state.unclipped_step_size).astype(
            state.unclipped_step_size.dtype
        ),
        skipped=state.skipped + (~ok).astype(state.skipped.dtype),
    )
    return jnp.where(ok, step, 0), ok, new_state


def scale_by_alig(
    max_lr: Scalar | None = None,
    eps: Scalar = 1e-5,
    f_min: Scalar = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the updates by AliG's step size computed from the loss value.

    .. math::

      u_t = \gamma_t\, g_t, \qquad
      \gamma_t = \min\left(\frac{\max(\ell_t - f_{\min}, 0)}{\|g_t\|^2 + \epsilon},
      \ \eta_{\max}\right)

    with :math:`\|g_t\|^2` the squared norm of the *incoming* updates over all leaves. The
    output is not negated: follow it with ``optax.scale(-1.0)`` (or use :func:`alig`).

    After another transformation, :math:`g_t` is that transformation's direction
    :math:`d_t` (e.g. Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)`), so the step is
    :math:`\ell_t / \|d_t\|^2`: the step that would reach ``f_min`` on the linearised loss if
    :math:`d_t` were the gradient. It is the exact Polyak step only for :math:`d_t = g_t`
    (for a preconditioned :math:`d = P g` that would be :math:`\ell / g^\top d`).

    bfloat16 updates: the norm and :math:`\gamma_t` are float32, each output leaf is
    :math:`\gamma_t g_t` rounded to its input dtype.

    A non-finite ``value`` or update makes the output zero and leaves the state unchanged
    except ``skipped``, which counts such steps. That protects this transformation only:
    transformations before it in a chain (Adam's moments) have already taken in a non-finite
    gradient, so guard the whole chain (e.g. ``optax.apply_if_finite``) or use :func:`alig`.

    Args:
      max_lr: the largest step size :math:`\eta_{\max}` (positive), or None for no clipping.
      eps: :math:`\epsilon \ge 0`, added to the squared norm.
      f_min: a lower bound on the loss (0 for cross-entropy and squared errors).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params=None, *, value, **extra)`` needs the scalar loss
      ``value``; other extra arguments are ignored. Its state is a :class:`ScaleByAligState`.

    Raises:
      ValueError: ``max_lr <= 0``, ``eps < 0`` or a non-finite ``f_min``.
      TypeError: (from ``update``) ``value`` was not given; (from ``init`` / ``update``) a
        parameter or update leaf is not floating (integer parameters cannot take a step).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxopt_suite import scale_by_alig
      >>> tx = optax.chain(optax.scale_by_adam(), scale_by_alig(max_lr=1.0), optax.scale(-1.0))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> state = tx.init(params)
      >>> value, grads = jax.value_and_grad(loss)(params)
      >>> updates, state = tx.update(grads, state, params, value=value)
    """
    _check_hyperparams(max_lr, eps, f_min)

    def init_fn(params: PyTree) -> ScaleByAligState:
        check_floating(params, "params", "scale_by_alig")
        return _step_size_state()

    def update_fn(updates, state, params=None, *, value=None, **extra):
        del params, extra
        check_floating(updates, "updates", "scale_by_alig")
        step, ok, new_state = _alig_step(updates, state, value, max_lr, eps, f_min)
        scaled = jax.tree.map(lambda g: jnp.where(ok, step * g, 0).astype(g.dtype), updates)
        return scaled, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alig(
    max_lr: Scalar | None = None,
    momentum: Scalar = 0.0,
    adjusted_momentum: bool = False,
    eps: Scalar = 1e-5,
    f_min: Scalar = 0.0,
    projection: Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The AliG optimizer: step size from the loss, optional momentum and projection.

    With :math:`\gamma_t` as in :func:`scale_by_alig` (computed from the raw gradient), the
    parameters move by the returned updates as

    .. math::

      \text{no momentum:}\quad & \theta \leftarrow \theta - \gamma_t g_t \\
      \text{momentum (paper form):}\quad & v \leftarrow \mu v - \gamma_t g_t, \quad
        \theta \leftarrow \theta + \mu v - \gamma_t g_t \\
      \text{adjusted momentum:}\quad & v \leftarrow \mu v - g_t, \quad
        \theta \leftarrow \theta + \gamma_t \mu v - \gamma_t g_t

    with :math:`v_0 = 0`, followed by :math:`\theta \leftarrow \Pi(\theta)` when a
    ``projection`` :math:`\Pi` is given. The returned updates are
    :math:`\Pi(\theta + \Delta) - \theta`, so ``optax.apply_updates`` lands on the projected
    point. The reference also projects the *initial* parameters when the optimizer is built;
    an optax transformation cannot change them, so project them yourself
    (``params = projection(params)``) before the first step.

    Under ``optax.MultiSteps`` the gradient is the accumulated (mean) gradient and ``value`` is
    the one passed with the last mini-step; pass the mean loss over the accumulated
    mini-batches there if you have it. Under ``optax.inject_hyperparams``, ``max_lr``,
    ``momentum``, ``eps`` and ``f_min`` may be traced; name a ``projection`` in
    ``static_args`` (otherwise optax takes the callable for a schedule).

    A step whose ``value`` or gradient is not finite returns zero updates and leaves the state
    unchanged (momentum included) except the counter ``state.alig.skipped``.

    bfloat16 parameters: the squared norm and :math:`\gamma_t` are computed in float32, the
    momentum buffer and the updates are stored in the parameters' dtype (each combination
    formed in float32, then rounded).

    Args:
      max_lr: the largest step size :math:`\eta_{\max}` (positive), or None for no clipping.
      momentum: :math:`\mu \in [0, 1)`. When it is the Python number 0, no buffer is kept.
      adjusted_momentum: use the second form above (TensorFlow-style Nesterov momentum with
        learning rate :math:`\gamma_t`) instead of the paper's.
      eps: :math:`\epsilon \ge 0`, added to the squared gradient norm.
      f_min: a lower bound on the loss.
      projection: a pure function ``params -> params`` applied after every step, e.g.
        ``functools.partial(project_l2_ball, max_norm=100.0)``; it needs ``params`` in
        ``update``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``value=`` (the scalar
      mini-batch loss) and ignores other extra arguments. Its state is an :class:`AligState`.

    Raises:
      ValueError: ``max_lr <= 0``, ``eps < 0``, ``momentum`` outside ``[0, 1)``, a non-finite
        ``f_min``, a ``projection`` that is not callable, or (from ``update``) a projection
        without ``params``.
      TypeError: (from ``update``) ``value`` was not given; (from ``init`` / ``update``) a
        parameter or update leaf is not floating (integer parameters cannot take a step).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxopt_suite import alig
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> tx = alig(max_lr=0.5, momentum=0.9)
      >>> state = tx.init(params)
      >>> value, grads = jax.value_and_grad(loss)(params)
      >>> updates, state = tx.update(grads, state, params, value=value)
      >>> params = optax.apply_updates(params, updates)
    """
    _check_hyperparams(max_lr, eps, f_min)
    _check_scalar("momentum", momentum, lambda x: 0 <= x < 1, "in [0, 1)")
    if not isinstance(adjusted_momentum, bool):
        raise TypeError(f"adjusted_momentum must be a bool, got {adjusted_momentum!r}")
    if projection is not None and not callable(projection):
        raise ValueError(
            f"projection must be a function params -> params or None, got {projection!r}"
        )
    # Static choice: a Python 0 means no momentum buffer at all (the plain method's memory);
    # any array (e.g. under inject_hyperparams) keeps one so the state structure never changes.
    use_velocity = not (isinstance(momentum, int | float) and momentum == 0)

    def init_fn(params: PyTree) -> AligState:
        check_floating(params, "params", "alig")
        velocity = optax.tree.zeros_like(params) if use_velocity else optax.EmptyState()
        return AligState(alig=_step_size_state(), velocity=velocity)

    def update_fn(updates, state, params=None, *, value=None, **extra):
        del extra
        if projection is not None and params is None:
            raise ValueError("alig with a projection needs params: call update(..., params)")
        check_floating(updates, "updates", "alig")
        step, ok, step_state = _alig_step(updates, state.alig, value, max_lr, eps, f_min)
        velocity = state.velocity
        if not use_velocity:
            delta = _scale_like(-step, updates)
        elif adjusted_momentum:
            velocity = jax.tree.map(
                lambda v, g: (momentum * v - g).astype(v.dtype), state.velocity, updates
            )
            delta = jax.tree.map(
                lambda v, g: (step * (momentum * v - g)).astype(g.dtype), velocity, updates
            )
        else:
            velocity = jax.tree.map(
                lambda v, g: (momentum * v - step * g).astype(v.dtype), state.velocity, updates
            )
            delta = jax.tree.map(
                lambda v, g: (momentum * v - step * g).astype(g.dtype), velocity, updates
            )
        if projection is not None:
            moved = projection(optax.apply_updates(params, delta))
            delta = jax.tree.map(lambda new, p: (new - p).astype(p.dtype), moved, params)
        delta = jax.tree.map(lambda d: jnp.where(ok, d, jnp.zeros_like(d)), delta)
        if use_velocity:
            velocity = _guard(ok, velocity, state.velocity)
        return delta, AligState(alig=step_state, velocity=velocity)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_l2_ball(tree: PyTree, max_norm: Scalar) -> PyTree:
    r"""Projects a whole pytree jointly onto the L2 ball of radius ``max_norm``.

    .. math::

      \Pi(\theta) = \theta \cdot \min\left(1, \frac{r}{\|\theta\|_2}\right),
      \qquad \|\theta\|_2^2 = \sum_{\text{leaves}} \sum_i \theta_i^2

    One norm over all leaves, not one per leaf (the reference's constraint, which replaces
    weight decay). The norm is accumulated in float32 for bfloat16/float16 leaves; each leaf
    keeps its dtype.

    Args:
      tree: parameters (any pytree of arrays).
      max_norm: the radius :math:`r > 0`; may be traced.

    Returns:
      The projected tree, same structure and dtypes.

    Raises:
      ValueError: ``max_norm <= 0`` (when concrete).
      TypeError: a leaf that is not floating (its scaled value would be rounded).

    Example:
      >>> import functools
      >>> tx = alig(max_lr=0.1, projection=functools.partial(project_l2_ball, max_norm=100.0))
    """
    _check_scalar("max_norm", max_norm, lambda x: x > 0, "positive")
    check_floating(tree, "tree", "project_l2_ball")
    norm = jnp.sqrt(global_sq_norm(tree))
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    return _scale_like(factor, tree)
