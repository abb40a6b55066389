r"""The rule interface: what the engine asks of a layer kind, and the registry of kinds.

A rule serves the leaves of one layer kind (its kernel-role and bias-role parameters; e.g.
LayerNorm's scale is its ``"kernel"``). The engine runs the model once with a zero
perturbation :math:`\varepsilon` added to every recognised layer's output and records the
layer's input; the cotangent of :math:`\varepsilon` is :math:`\delta = \partial L / \partial z`,
stacked over the K columns of a source (one column for first-order quantities, the K
backpropagated columns of the loss Hessian's square root for GGN and Hessian quantities):
``delta`` is (K, N, *layer output shape[1:]). Every statistic is one of the per-(column,
sample) gradients :math:`\hat g_{k,n}` of a leaf (:data:`STATISTICS`, ``columns``, ``kron``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature import layers
from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.layers import LayerCall, ModuleInterception, OpInterception

#: The first-order statistics of the per-(column, sample) gradients (K, N, *leaf) of a leaf:
#: ``individual`` :math:`\hat g_{0,n}` (N, *leaf); ``individual_sq_norm``
#: :math:`\|\hat g_{0,n}\|^2` (N,); ``sum_sq`` :math:`\sum_{k,n} \hat g_{k,n}^{\odot 2}` (leaf);
#: ``individual_sum_sq`` :math:`\sum_k \hat g_{k,n}^{\odot 2}` (N, *leaf).
STATISTICS = ("individual", "individual_sq_norm", "sum_sq", "individual_sum_sq")

#: Every statistic a rule serves: :data:`STATISTICS`, ``columns`` (the per-(column, sample)
#: gradients (K, N, *leaf)) and ``kron`` (Kronecker factors or None).
ALL_STATISTICS = (*STATISTICS, "columns", "kron")

#: The roles of a layer's leaves.
ROLES = ("kernel", "bias")

Factors = tuple[jax.Array, ...] | None


class LayerRule:
    """Base class of the per-kind rules; a rule overrides what its kind supports.

    Attributes:
      kind: the name the registry, :func:`~jaxopt_suite.curvature.coverage` and
        :class:`~jaxopt_suite.curvature.EngineConfig` know the kind by.
      interception: how discovery finds the kind's layers while the model is traced
        (:class:`~jaxopt_suite.curvature.layers.ModuleInterception` or
        :class:`~jaxopt_suite.curvature.layers.OpInterception`).
      kfra_link: whether KFRA counts the kind's layers as links of its chain (it refuses
        links without :meth:`kfra_supported`); otherwise KFRA treats them as part of the
        function between links and gives their leaves None.
    """

    kind: str = ""
    interception: ModuleInterception | OpInterception | None = None
    kfra_link: bool = False

    def prepare(self, call: LayerCall, recorded: jax.Array) -> jax.Array:
        """What the statistics consume, computed once per layer from the recorded input."""
        return recorded

    def statistic(
        self,
        statistic: str,
        call: LayerCall,
        role: str,
        prepared: jax.Array,
        delta: jax.Array,
        config: EngineConfig,
    ) -> jax.Array:
        """One of :data:`STATISTICS` of the leaf in ``role``."""
        raise NotImplementedError(f"the {self.kind!r} rule has no statistic method")

    def columns(self, call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array):
        """The per-(column, sample) gradients (K, N, *leaf) of the leaf in ``role`` (the GGN
        square root ``sqrt_ggn_*``)."""
        raise NotImplementedError(f"the {self.kind!r} rule has no columns method")

    def kron(self, call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array) -> Factors:
        """Kronecker factors of the leaf in ``role`` (:mod:`jaxopt_suite.curvature.kron`'s
        conventions), or None."""
        return None

    def summed_gradient(
        self,
        call: LayerCall,
        prepared: jax.Array,
        delta: jax.Array,
        gradient: jax.Array,
        config: EngineConfig,
    ) -> jax.Array:
        """The mini-batch gradient of the kernel leaf, given ``gradient``, the VJP's, and the
        single output cotangent ``delta`` (N, ...): a rule may compute it more cheaply from
        what it prepared anyway."""
        return gradient

    def weighted_sum(
        self,
        call: LayerCall,
        role: str,
        prepared: jax.Array,
        delta: jax.Array,
        weights: jax.Array,
        config: EngineConfig,
    ) -> jax.Array:
        r""":math:`\sum_n w_n \hat g_{0,n}` of the leaf in ``role`` (leaf-shaped, float32 at
        least), for the gradient's cotangents ``delta`` (1, N, ...) and per-sample weights
        ``weights`` (N,) (per-sample clipping, :mod:`jaxopt_suite.privacy`). The default
        reduces the ``individual`` statistic (an (N, *leaf) buffer); a rule whose gradient is
        linear in ``delta`` forms it as its summed gradient with ``delta`` scaled per sample."""
        individual = wide(self.statistic("individual", call, role, prepared, delta, config))
        return jnp.tensordot(weights.astype(individual.dtype), individual, axes=1)

    def kfra_supported(self, call: LayerCall) -> bool:
        """Whether KFRA can take ``call`` as a link of its chain (a Dense layer on
        (N, features) inputs, a Conv layer with one feature group)."""
        return False

    def kfra_input_factor(self, call: LayerCall, prepared: jax.Array) -> jax.Array:
        """KFRA's A of the kernel leaf (asked only where :meth:`kfra_supported`)."""
        raise NotImplementedError(f"the {self.kind!r} rule has no KFRA factor")

    def kfra_backpropagate(
        self, call: LayerCall, kernel: jax.Array, hessian: jax.Array, input_shape: tuple
    ) -> jax.Array:
        r"""KFRA's batch-averaged Hessian w.r.t. the layer's input from the one w.r.t. its
        output (``hessian``, (d_out, d_out) over one sample's output flattened row-major):
        :math:`J^\top \bar H J` with :math:`J` the Jacobian of the layer's output in its input
        (the same for every sample: the layer is linear in its input); ``input_shape`` is
        (N, ...) (asked only where :meth:`kfra_supported`)."""
        raise NotImplementedError(f"the {self.kind!r} rule has no KFRA backpropagation")

    def kfra_output_factor(self, call: LayerCall, hessian: jax.Array) -> jax.Array:
        """KFRA's G of the layer's leaves from the batch-averaged Hessian w.r.t. its output
        (d_out, d_out): ``hessian`` itself unless the rule says otherwise."""
        return hessian


def check_statistic(statistic: str) -> None:
    """Raises ValueError unless ``statistic`` is one of :data:`ALL_STATISTICS`."""
    if statistic not in ALL_STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {', '.join(ALL_STATISTICS)}")


def low(a: Any) -> bool:
    """Whether ``a`` is bfloat16 or float16."""
    return jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def wide(x: jax.Array) -> jax.Array:
    """``x`` in float32 at least."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def widened(prepared: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both in float32 when either is low precision, so sums accumulate in float32."""
    if low(prepared) or low(delta):
        return wide(prepared), wide(delta)
    return prepared, delta


# --- registry --------------------------------------------------------------------------------

_RULES: dict[str, LayerRule] = {}
_METHODS = (
    "prepare",
    "statistic",
    "columns",
    "kron",
    "summed_gradient",
    "weighted_sum",
    "kfra_supported",
    "kfra_input_factor",
    "kfra_backpropagate",
    "kfra_output_factor",
)


def register_rule(rule: LayerRule) -> LayerRule:
    """Registers ``rule`` for ``rule.kind`` and makes discovery find its layers.

    Args:
      rule: a :class:`LayerRule` (instance of a subclass) with a new ``kind`` and an
        ``interception``.

    Returns:
      ``rule``.

    Raises:
      TypeError: ``rule`` is not a :class:`LayerRule` or lacks an interception.
      ValueError: its kind is empty or already registered, or one of its classes is already
        intercepted for another kind.
    """
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule instance; got {type(rule).__name__}")
    missing = [m for m in _METHODS if not callable(getattr(rule, m, None))]
    if missing:
        raise TypeError(f"rule {rule.kind!r} lacks the methods {missing}")
    if not isinstance(rule.kind, str) or not rule.kind:
        raise ValueError(f"rule.kind must be a non-empty string; got {rule.kind!r}")
    if rule.kind == "generic":
        raise ValueError("rule.kind 'generic' names the generic path; choose another name")
    if rule.kind in _RULES:
        raise ValueError(
            f"a rule for kind {rule.kind!r} is already registered "
            f"({type(_RULES[rule.kind]).__name__}); registered: {', '.join(_RULES)}"
        )
    if not isinstance(rule.interception, ModuleInterception | OpInterception):
        raise TypeError(
            f"rule {rule.kind!r}: interception must be a layers.ModuleInterception or "
            f"layers.OpInterception; got {type(rule.interception).__name__}"
        )
    layers.intercept(rule.kind, rule.interception)
    _RULES[rule.kind] = rule
    return rule


def get_rule(kind: str) -> LayerRule:
    """The rule registered for ``kind``.

    Raises:
      KeyError: no rule for ``kind``.
    """
    try:
        return _RULES[kind]
    except KeyError:
        raise KeyError(f"no rule for kind {kind!r}; registered: {', '.join(_RULES)}") from None


def registered_kinds() -> tuple[str, ...]:
    """The kinds with a rule, in registration order."""
    return tuple(_RULES)


def check_kinds(kinds: Sequence[str] | None) -> None:
    """Raises ValueError unless every name in ``kinds`` (None: all) has a rule."""
    unknown = sorted(set(kinds or ()) - set(_RULES))
    if unknown:
        raise ValueError(f"no rule for kinds {unknown}; registered: {', '.join(_RULES)}")
