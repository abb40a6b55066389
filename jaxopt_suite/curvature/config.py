"""``EngineConfig``: the curvature engine's tuning options, passed as an argument."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How :func:`~jaxopt_suite.curvature.value_and_grad` computes its quantities.

    Every option changes how the quantities are computed, never their values (up to
    floating-point rounding), except ``kinds``, which only moves leaves between the structured
    and the generic path (same values, other cost). Frozen and hashable, so it can be a static
    argument; the default is the engine's standard behaviour.

    Attributes:
      column_groups: groups in which the loss-Hessian columns of ``diag_ggn_exact`` /
        ``diag_ggn_mc`` are backpropagated, one ``jax.vmap`` of the VJP per group
        (:func:`~jaxopt_suite.curvature.backprop.backpropagate_columns`); None: one group per
        CPU core the process may use. At least two groups (for K > 1 columns); K or more: one
        VJP call per column.
      unroll_columns: up to this many columns are backpropagated in groups; more go through a
        sequential ``lax.map`` (bounded memory).
      kernel_grad_from_patches: the gradient of a float32 Conv kernel with one feature group
        as one matrix product of the patches the rules unfold anyway; False keeps the kernel
        cotangent of the convolution's own VJP.
      per_sample_product: a Conv kernel's multi-column ``sum_sq`` takes one 2-D product per
        sample in a loop when that product has at least this many entries; smaller ones take
        the chunked batched product.
      conv_few_weights: a Conv kernel's multi-column ``sum_sq`` / ``individual_sum_sq``
        contracts the cotangents in their own layout when the output positions outnumber the
        kernel's inputs (and the result is small); False sends those layers down the other
        formulations.
      sample_chunk_bytes: per-sample Conv kernel gradients are formed and reduced for this many
        bytes of samples at a time.
      residual_chunk: residual (activation-curvature) columns of ``diag_h`` backpropagated
        together (``vmap``) per step of the scan over them, and the one-hot tangents per step
        of its exact fallback (:func:`~jaxopt_suite.curvature.hessian.generic_diagonal`).
      memory_budget_bytes: the most bytes one step of an exact ``diag_h`` fallback (the
        one-hot Hessian-vector products of a model the residual mechanism can't take, the
        residual of leaves no rule covers) may be estimated to need
        (:func:`~jaxopt_suite.curvature.hessian.peak_bytes` of the step's jaxpr); a larger
        step raises ``MemoryError`` at trace time, before anything is compiled. None: no
        check. Default 4 GiB.
      banded_conv_cotangent: 2-D stride-1 convolutions backpropagate the input cotangent
        through the banded formulation of :mod:`~jaxopt_suite.curvature.fastgrad` inside the
        engine's reverse pass; False keeps the transposed convolution.
      kinds: the layer kinds that get their rule (names from
        :func:`~jaxopt_suite.curvature.rules.registered_kinds`); None: every registered kind.
        Leaves of other kinds take the generic per-sample path.
    """

    column_groups: int | None = None
    unroll_columns: int = 16
    kernel_grad_from_patches: bool = True
    per_sample_product: int = 1 << 16
    conv_few_weights: bool = True
    sample_chunk_bytes: int = 8 << 20
    residual_chunk: int = 32
    banded_conv_cotangent: bool = True
    kinds: tuple[str, ...] | None = None
    memory_budget_bytes: int | None = 4 << 30

    def __post_init__(self) -> None:
        for name in ("unroll_columns", "per_sample_product", "sample_chunk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        if not isinstance(self.residual_chunk, int) or self.residual_chunk < 1:
            raise ValueError(
                f"residual_chunk must be a positive integer; got {self.residual_chunk!r}"
            )
        if self.column_groups is not None and (
            not isinstance(self.column_groups, int) or self.column_groups < 1
        ):
            raise ValueError(
                f"column_groups must be a positive integer or None; got {self.column_groups!r}"
            )
        if self.memory_budget_bytes is not None and (
            not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes < 1
        ):
            raise ValueError(
                "memory_budget_bytes must be a positive integer or None; got "
                f"{self.memory_budget_bytes!r}"
            )
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))


DEFAULT = EngineConfig()
