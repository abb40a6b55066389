r"""Per-sample gradient clipping and DP-SGD from the curvature engine's one pass.

For sample :math:`n` with loss :math:`\ell_n` (the unreduced per-sample term of the loss: for
outputs with positions, the sum over the sample's positions) and gradient
:math:`g_n = \nabla_\theta \ell_n`, clipping to the norm :math:`C` keeps

.. math::
   \bar g_n = w_n g_n, \qquad w_n = m_n \min\!\big(1, C / \|g_n\|\big),

with :math:`m_n` the caller's per-sample weight (0 for a padded sample, so it counts as
absent). :func:`clipped_value_and_grad` forms :math:`\sum_n \bar g_n` the book-keeping way:
the engine's forward and backward pass records every recognised layer's input :math:`x` and
output cotangent :math:`\delta`; the norms come from them without forming any :math:`g_n`
(``batch_l2``), and a Dense kernel's clipped sum is :math:`x^\top \mathrm{diag}(w)\,\delta`,
one product like its gradient (:meth:`~jaxopt_suite.curvature.rules.LayerRule.weighted_sum`);
parameters no rule serves take the engine's exact per-sample path. No second backward pass.

DP-SGD (Abadi et al., 2016) adds Gaussian noise to the clipped sum and divides by the expected
batch size :math:`B`: :math:`\tilde g = (\sum_n \bar g_n + \sigma C \xi) / B`,
:math:`\xi \sim \mathcal N(0, I)`, as the optax transformation :func:`dp_aggregate`;
:func:`dp_sgd` and :func:`dp_adam` chain it with SGD or Adam. Batches drawn by
:func:`poisson_batch` (each example independently with probability :math:`q`) are what the
privacy account of :func:`epsilon` and :func:`noise_multiplier_for` assumes (Google's
``dp-accounting``, a Poisson-subsampled Gaussian mechanism composed over the steps).

References:
  Abadi et al., *Deep Learning with Differential Privacy*, CCS 2016.
  Li et al., *Large Language Models Can Be Strong Differentially Private Learners*, ICLR 2022
  (ghost clipping); Bu et al., *Differentially Private Optimization on Large Model at Small
  Cost*, ICML 2023 (book-keeping).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite._typing import PyTree
from jaxopt_suite.curvature import losses
from jaxopt_suite.curvature.config import DEFAULT, EngineConfig
from jaxopt_suite.curvature.engine import weighted_gradient

__all__ = [
    "DPAggregateState",
    "clipped_value_and_grad",
    "dp_adam",
    "dp_aggregate",
    "dp_sgd",
    "epsilon",
    "noise_multiplier_for",
    "padded_batch_size",
    "poisson_batch",
]

ACCOUNTANTS = ("rdp", "pld")


def _positive(name: str, value: Any) -> None:
    """Raises unless a concrete ``value`` is a positive real number (traced values pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | jax.Array):
        raise TypeError(f"{name} must be a positive real number; got {type(value).__name__}")
    if np.ndim(value) != 0 or not float(value) > 0 or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a positive finite number (> 0); got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | jax.Array):
        raise TypeError(f"{name} must be a real number >= 0; got {type(value).__name__}")
    if np.ndim(value) != 0 or not float(value) >= 0 or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def clipped_value_and_grad(
    apply_fn: Callable[[PyTree, Any], jax.Array],
    *,
    loss: str | losses.PerSampleLoss,
    max_norm: float,
    reduction: str = "mean",
    per_layer: bool = False,
    chunk_size: int | None = None,
    config: EngineConfig = DEFAULT,
) -> Callable[..., tuple[jax.Array, PyTree, Any]]:
    r"""Builds ``fn(params, inputs, targets, *, weights=None) -> (value, grads, norms)``.

    With :math:`g_n = \nabla_\theta \ell_n`, :math:`w_n = m_n \min(1, C / \|g_n\|)` and the
    per-sample weights :math:`m_n` (``weights``; all 1 when None):

    .. math::
       \text{grads} = \frac{1}{Z} \sum_n w_n g_n, \qquad
       \text{value} = \frac{1}{Z} \sum_n m_n \ell_n, \qquad
       \text{norms}_n = \|g_n\|,

    :math:`Z = \sum_n m_n` for ``"mean"`` (a batch whose weights are all 0 gives zeros) and
    :math:`Z = 1` for ``"sum"`` (DP-SGD's input, :func:`dp_aggregate`). :math:`\ell_n` is the
    unreduced per-sample loss of the curvature engine (cross-entropy over (N, T, C) outputs:
    the sum of the sample's T token losses; a padded token is absent when the loss gives it
    0, e.g. a callable loss that masks it through its target). With ``per_layer`` each
    parameter leaf (a layer's kernel and its bias separately) is clipped to :math:`C` on
    its own, :math:`w_{n,l} = m_n \min(1, C / \|g_{n,l}\|)`, and ``norms`` is a pytree of
    (N,) arrays like ``params``; the clipped gradient's norm is then at most
    :math:`C \sqrt{L}` for L leaves.

    One forward and one backward pass of the engine
    (:func:`~jaxopt_suite.curvature.value_and_grad`): the norms from each recognised layer's
    input and output cotangent, the clipped sums as one product per kernel
    (:meth:`~jaxopt_suite.curvature.rules.LayerRule.weighted_sum`), the per-sample gradients
    of the other leaves by the generic path (an (N, *leaf) buffer per such leaf). Samples
    must not interact inside the model (the engine refuses BatchNorm in training mode).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (N, ...), pure.
      loss: as :func:`~jaxopt_suite.curvature.value_and_grad`: ``"cross_entropy"``,
        ``"mse"``, ``"bce_with_logits"`` or a callable ``loss(output, target)`` for one sample.
      max_norm: :math:`C > 0`.
      reduction: ``"mean"`` or ``"sum"``.
      per_layer: clip each leaf to ``max_norm`` instead of all parameters together.
      chunk_size: samples per chunk of the generic path (bounds its memory).
      config: the engine's :class:`~jaxopt_suite.curvature.EngineConfig`.

    Returns:
      A jittable function; ``weights`` is None or an (N,) array (floating or boolean).

    Raises:
      ValueError: ``max_norm`` <= 0, an unknown reduction; at trace time ``weights`` not of
        shape (N,), or what :func:`~jaxopt_suite.curvature.value_and_grad` refuses.
      TypeError: ``max_norm`` not a number, ``per_layer`` not a bool.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> model = nn.Dense(3)
      >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> fn = clipped_value_and_grad(lambda p, x: model.apply({"params": p}, x),
      ...                             loss="cross_entropy", max_norm=0.1)
      >>> value, grads, norms = fn(params, x, y, weights=jnp.array([1.0, 1.0, 1.0, 0.0]))
      >>> norms.shape, bool(optax.tree.norm(grads) <= 0.1 + 1e-6)
      ((4,), True)
    """
    _positive("max_norm", max_norm)
    if reduction not in losses.REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(losses.REDUCTIONS)}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False; got {per_layer!r}")
    c = float(max_norm)

    def factor(sq_norm: jax.Array) -> jax.Array:
        norm = jnp.sqrt(sq_norm)
        return c / jnp.maximum(norm, c)  # = min(1, C / norm), never dividing by 0

    def fn(params: PyTree, inputs: Any, targets: jax.Array, *, weights: jax.Array | None = None):
        n = jax.tree.leaves(inputs)[0].shape[0]
        m = _check_weights(weights, n)

        def weigh(sq_norms: PyTree) -> PyTree:
            if per_layer:
                return jax.tree.map(lambda s: m * factor(s), sq_norms)
            total = sum(jax.tree.leaves(sq_norms))
            w = m * factor(total)
            return jax.tree.map(lambda _: w, sq_norms)

        per_sample, sq_norms, summed = weighted_gradient(
            apply_fn, loss=loss, weigh=weigh, chunk_size=chunk_size, config=config
        )(params, inputs, targets)
        if per_layer:
            norms = jax.tree.map(jnp.sqrt, sq_norms)
        else:
            norms = jnp.sqrt(sum(jax.tree.leaves(sq_norms)))
        value = jnp.sum(m * per_sample)
        if reduction == "mean":
            count = jnp.sum(m)
            inverse = jnp.where(count > 0, 1.0 / jnp.where(count > 0, count, 1.0), 0.0)
            value = value * inverse
            summed = jax.tree.map(lambda g: (g * inverse).astype(g.dtype), summed)
        return value, summed, norms

    return fn


def _check_weights(weights: jax.Array | None, n: int) -> jax.Array:
    """The per-sample weights (N,) in float32; refuses another shape or a non-numeric dtype."""
    if weights is None:
        return jnp.ones((n,), jnp.float32)
    weights = jnp.asarray(weights)
    if weights.shape != (n,):
        raise ValueError(
            f"weights must have shape (N,) = ({n},), one weight (or mask entry) per sample; "
            f"got shape {weights.shape}"
        )
    if not (jnp.issubdtype(weights.dtype, jnp.floating) or weights.dtype == jnp.bool_):
        raise TypeError(f"weights must be floating-point or boolean; got dtype {weights.dtype}")
    return weights.astype(jnp.float32)


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`.

    Attributes:
      key: the PRNG key of the next step's noise (split on every update).
    """

    key: jax.Array


def dp_aggregate(
    noise_multiplier: float | jax.Array,
    max_norm: float | jax.Array,
    expected_batch_size: int | float | jax.Array,
    key: jax.Array | None,
) -> optax.GradientTransformation:
    r"""DP-SGD's noisy average of a sum of clipped per-sample gradients.

    .. math:: \tilde g = \frac{1}{B} \Big(\sum_n \bar g_n + \sigma C\, \xi\Big), \qquad
              \xi \sim \mathcal N(0, I) \text{ per coordinate},

    where the updates are :math:`\sum_n \bar g_n`, the clipped sum of
    ``clipped_value_and_grad(..., max_norm=C, reduction="sum")`` with padded samples weighted
    0, :math:`B` is the expected batch size (:math:`q` times the dataset size for Poisson
    sampling, :func:`poisson_batch`), and the key is carried in the state and split on every
    step. The updates must be clipped to the same :math:`C` (this transformation cannot see
    the per-sample gradients). ``noise_multiplier``, ``max_norm`` and ``expected_batch_size``
    may be traced (``optax.inject_hyperparams``).

    Args:
      noise_multiplier: :math:`\sigma \ge 0`.
      max_norm: the clipping norm :math:`C > 0`.
      expected_batch_size: :math:`B > 0`.
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DPAggregateState`.

    Raises:
      ValueError: ``key`` is None, ``noise_multiplier`` < 0, ``max_norm`` or
        ``expected_batch_size`` <= 0 (checked where they are concrete).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> tx = dp_aggregate(0.0, 1.0, 4, jax.random.key(0))
      >>> summed = {"w": jnp.array([2.0, 4.0])}
      >>> tx.update(summed, tx.init(summed))[0]["w"]
      Array([0.5, 1. ], dtype=float32)
    """
    if key is None:
        raise ValueError(
            "dp_aggregate needs key=, a PRNG key (jax.random.key(seed)) for the noise; "
            "reusing or omitting it would void the privacy guarantee"
        )
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a PRNG key array; got {type(key).__name__}")
    _non_negative("noise_multiplier", noise_multiplier)
    _positive("max_norm", max_norm)
    _positive("expected_batch_size", expected_batch_size)

    def init_fn(params: PyTree) -> DPAggregateState:
        del params
        return DPAggregateState(key=key)

    def update_fn(updates: PyTree, state: DPAggregateState, params: PyTree = None):
        del params
        next_key, noise_key = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(noise_key, len(leaves))
        scale = noise_multiplier * max_norm
        noisy = [
            ((g + scale * jax.random.normal(k, g.shape, g.dtype)) / expected_batch_size).astype(
                g.dtype
            )
            for g, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noisy), DPAggregateState(key=next_key)

    return optax.GradientTransformation(init_fn, update_fn)


def dp_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    noise_multiplier: float | jax.Array,
    max_norm: float | jax.Array,
    expected_batch_size: int | float | jax.Array,
    key: jax.Array | None,
    momentum: float | None = None,
) -> optax.GradientTransformation:
    r"""DP-SGD: :func:`dp_aggregate` chained with ``optax.sgd``.

    .. math:: \theta \leftarrow \theta - \eta\, \frac{1}{B}\Big(\sum_n \bar g_n + \sigma C
              \xi\Big)

    (with heavy-ball momentum when ``momentum`` is given). The updates are the sum of clipped
    per-sample gradients, ``clipped_value_and_grad(..., max_norm=C, reduction="sum")``.

    Args:
      learning_rate: :math:`\eta` or a schedule.
      noise_multiplier, max_norm, expected_batch_size, key: as :func:`dp_aggregate`.
      momentum: optax.sgd's momentum (None: none).

    Returns:
      ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum))``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> tx = dp_sgd(0.1, noise_multiplier=1.0, max_norm=1.0, expected_batch_size=8,
      ...             key=jax.random.key(0))
      >>> params = {"w": jnp.zeros(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params))
      >>> updates["w"].shape
      (3,)
    """
    return optax.chain(
        dp_aggregate(noise_multiplier, max_norm, expected_batch_size, key),
        optax.sgd(learning_rate, momentum=momentum),
    )


def dp_adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    noise_multiplier: float | jax.Array,
    max_norm: float | jax.Array,
    expected_batch_size: int | float | jax.Array,
    key: jax.Array | None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    r"""DP-Adam: :func:`dp_aggregate` chained with ``optax.adam`` (Adam on the noisy average
    :math:`\tilde g` of :func:`dp_aggregate`; post-processing, so the privacy is DP-SGD's).

    Args:
      learning_rate: Adam's step size or a schedule.
      noise_multiplier, max_norm, expected_batch_size, key: as :func:`dp_aggregate`.
      b1, b2, eps: ``optax.adam``'s.

    Returns:
      ``optax.chain(dp_aggregate(...), optax.adam(learning_rate, b1, b2, eps))``.
    """
    return optax.chain(
        dp_aggregate(noise_multiplier, max_norm, expected_batch_size, key),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )


# --- sampling -------------------------------------------------------------------------------


def _check_rate(sampling_rate: float) -> None:
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int | float | np.number):
        raise TypeError(f"sampling_rate must be a number in (0, 1]; got {sampling_rate!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def padded_batch_size(num_examples: int, sampling_rate: float, overflow: float = 1e-9) -> int:
    r"""The smallest :math:`B` with :math:`P(\mathrm{Binomial}(n, q) > B) \le` ``overflow``:
    the fixed batch size that a Poisson-sampled batch of ``num_examples`` examples at rate
    :math:`q` exceeds with probability at most ``overflow`` (exact binomial tail).

    Args:
      num_examples: the dataset size :math:`n \ge 1`.
      sampling_rate: :math:`q \in (0, 1]`.
      overflow: the accepted probability of a larger batch, in (0, 1).

    Returns:
      :math:`B \le n`.

    Example:
      >>> padded_batch_size(1000, 0.5, overflow=0.5)
      500
    """
    _check_count("num_examples", num_examples, 1)
    _check_rate(sampling_rate)
    if not 0 < overflow < 1:
        raise ValueError(f"overflow must be in (0, 1); got {overflow!r}")
    if sampling_rate == 1:
        return int(num_examples)
    k = np.arange(num_examples + 1)
    log_pmf = (
        np.array([math.lgamma(num_examples + 1)])
        - np.vectorize(math.lgamma)(k + 1)
        - np.vectorize(math.lgamma)(num_examples - k + 1)
        + k * math.log(sampling_rate)
        + (num_examples - k) * math.log1p(-sampling_rate)
    )
    tail = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # tail[b] = P(X >= b)
    above = np.append(tail[1:], 0.0)  # above[b] = P(X > b)
    return int(np.argmax(above <= overflow))


def poisson_batch(
    rng: np.random.Generator, num_examples: int, sampling_rate: float, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One Poisson-sampled batch, padded to a fixed size: every example is in it independently
    with probability ``sampling_rate`` (the sampling the privacy account assumes).

    Args:
      rng: a ``numpy.random.Generator`` (host-side: the batch is gathered before the step).
      num_examples: the dataset size.
      sampling_rate: :math:`q \\in (0, 1]`.
      batch_size: the fixed size (e.g. :func:`padded_batch_size`).

    Returns:
      ``(indices, mask)``, both (batch_size,): the drawn examples' indices followed by index 0
      as padding, and ``mask`` True for the drawn ones (pass it as ``weights``).

    Raises:
      ValueError: more than ``batch_size`` examples were drawn (dropping some would break the
        sampling the account assumes; choose ``batch_size`` with :func:`padded_batch_size`).

    Example:
      >>> import numpy as np
      >>> indices, mask = poisson_batch(np.random.default_rng(0), 10, 0.5, 10)
      >>> indices[mask], mask.shape
      (array([1, 2, 3]), (10,))
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    _check_count("num_examples", num_examples, 1)
    _check_rate(sampling_rate)
    _check_count("batch_size", batch_size, 1)
    drawn = np.flatnonzero(rng.random(num_examples) < sampling_rate)
    if drawn.size > batch_size:
        raise ValueError(
            f"the Poisson sample holds {drawn.size} examples, more than batch_size="
            f"{batch_size}; dropping some would invalidate the privacy account. Use a larger "
            "batch_size (padded_batch_size(num_examples, sampling_rate))"
        )
    indices = np.zeros(batch_size, np.int64)
    indices[: drawn.size] = drawn
    mask = np.arange(batch_size) < drawn.size
    return indices, mask


# --- accounting -----------------------------------------------------------------------------


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError(
            "privacy accounting needs Google's dp-accounting package: pip install "
            "'jaxopt_suite[privacy]' (or pip install dp-accounting)"
        ) from err
    return dp_accounting


def _event(dpa, noise_multiplier: float, sampling_rate: float, steps: int):
    step = dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, steps)


def _accountant(dpa, accountant: str):
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    if accountant == "pld":
        return dpa.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float | np.number):
        raise TypeError(f"delta must be a number in (0, 1); got {delta!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "rdp",
) -> float:
    r"""The privacy spent, :math:`\varepsilon` at :math:`\delta`, by ``steps`` steps of DP-SGD.

    Each step is the Gaussian mechanism with noise :math:`\sigma C` on a sum of per-sample
    contributions of norm at most :math:`C`, applied to a Poisson sample at rate :math:`q`;
    the steps compose. Computed by Google's ``dp-accounting`` (``"rdp"``: Rényi DP, Mironov
    et al. 2019; ``"pld"``: privacy loss distributions, tighter).

    Args:
      noise_multiplier: :math:`\sigma \ge 0` (0 gives infinity).
      sampling_rate: :math:`q \in (0, 1]`.
      steps: the number of steps, >= 0.
      delta: :math:`\delta \in (0, 1)`.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      :math:`\varepsilon` (a Python float; ``inf`` for :math:`\sigma = 0` and steps > 0).

    Example:
      >>> round(epsilon(1.1, 256 / 60000, 60 * 60000 // 256, 1e-5), 2)  # 60 epochs of MNIST
      2.6
    """
    _non_negative("noise_multiplier", noise_multiplier)
    _check_rate(sampling_rate)
    _check_count("steps", steps, 0)
    _check_delta(delta)
    dpa = _dp_accounting()
    acc = _accountant(dpa, accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc.compose(_event(dpa, float(noise_multiplier), float(sampling_rate), int(steps)))
    return float(acc.get_epsilon(float(delta)))


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "rdp",
) -> float:
    r"""The smallest noise multiplier :math:`\sigma` whose ``steps`` DP-SGD steps at rate
    :math:`q` spend at most ``epsilon`` at ``delta`` (:func:`epsilon` is decreasing in
    :math:`\sigma`; found by ``dp_accounting.calibrate_dp_mechanism``, searching from
    :math:`\sigma = 10^{-3}` up, within :math:`10^{-4}` of the optimum, and it meets the
    budget).

    Args:
      epsilon: the target :math:`\varepsilon > 0`.
      delta: :math:`\delta \in (0, 1)`.
      sampling_rate: :math:`q \in (0, 1]`.
      steps: the number of steps, >= 1.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      :math:`\sigma` with ``epsilon(sigma, sampling_rate, steps, delta) <= epsilon``.

    Example:
      >>> sigma = noise_multiplier_for(3.0, 1e-5, 0.01, 1000)
      >>> epsilon(sigma, 0.01, 1000, 1e-5) <= 3.0
      True
    """
    _positive("epsilon", epsilon)
    _check_delta(delta)
    _check_rate(sampling_rate)
    _check_count("steps", steps, 1)
    dpa = _dp_accounting()
    _accountant(dpa, accountant)
    sigma = dpa.calibrate_dp_mechanism(
        lambda: _accountant(dpa, accountant),
        lambda s: _event(dpa, s, float(sampling_rate), int(steps)),
        float(epsilon),
        float(delta),
        dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(sigma)
