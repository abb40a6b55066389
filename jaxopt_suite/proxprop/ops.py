"""ProxProp as pure ``jax.custom_vjp`` ops: the forward pass is the layer's own, the backward
pass hands the optimizer a proximal direction instead of the gradient.

For a layer :math:`z = A(x)\\,\\Theta` that is linear in its parameters :math:`\\Theta`, with
output cotangent :math:`g_z` (it already carries the 1/N of a mean loss) and
:math:`\\beta = 1/\\tau_{\\text{prox}}`, the parameter cotangent becomes

.. math::

  d = \\Theta - \\operatorname*{argmin}_X \\tfrac12 \\|A X - (z - g_z)\\|^2
      + \\tfrac{\\beta}{2} \\|X - \\Theta\\|^2 = (A^\\top A + \\beta I)^{-1} \\nabla_\\Theta L,

solved exactly (``"prox_exact"``), approximately by K conjugate-gradient iterations from
:math:`d = 0` (``"prox_cg<K>"``), or not at all (``"gradient"``: :math:`d = \\nabla_\\Theta L`
through the same code path, for fair timing). The Gram matrix :math:`A^\\top A` is summed over
the batch. The input cotangent is the ordinary one, :math:`A_\\Theta^\\top g_z` at the current
parameters, so layers below receive plain backprop.

Three ops: :func:`proxprop_dense` (explicit matmuls, one CG per output unit, exact by a Cholesky
solve in the primal or the Woodbury form), :func:`proxprop_conv` (one CG per output channel,
matrix-free; exact from the Gram matrix of the unfolded input patches) and
:func:`proxprop_linear` (any map linear in its parameters; one CG over all of them, the operator
applied as the Gauss-Newton product :math:`J^\\top J`, jvp then vjp).

Precision: with bfloat16 or float16 inputs and parameters, the forward pass, the input
cotangent and the ``"gradient"`` mode stay in the given dtypes; the proximal solve (Gram
matrix, CG products, inner products and iterates, Cholesky factor and substitutions) runs in
float32 on upcast copies (a solve in bfloat16 itself would lose a visible part of the
direction), and the direction is cast back to each parameter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxopt_suite._typing import PyTree
from jaxopt_suite.proxprop import solvers

# Largest parameter count for which the generic op builds the full Gram matrix (prox_exact).
MAX_GENERIC_EXACT_SIZE = 4096


def _upcast(tree: PyTree) -> PyTree:
    """Floating leaves narrower than float32 as float32 (the solvers' working precision)."""

    def cast(a):
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(jnp.promote_types(a.dtype, jnp.float32))
        return a

    return jax.tree.map(cast, tree)


def _tau_array(tau_prox: Any, dtype: Any) -> jax.Array:
    solvers.check_tau(tau_prox)
    return jnp.asarray(tau_prox, dtype=jnp.promote_types(dtype, jnp.float32))


def proxprop_dense(
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    tau_prox: float | jax.Array = 1.0,
    optimization_mode: str = "prox_cg1",
    precision: Any = None,
) -> jax.Array:
    """``inputs @ kernel + bias`` whose backward pass returns the ProxProp direction.

    With :math:`A = [x, 1]` (rows: every position of the flattened leading axes) and
    :math:`\\Theta = [W; b]`, the kernel and bias cotangents are
    :math:`d = (A^\\top A + \\tau^{-1} I)^{-1} A^\\top g_z` (``"prox_exact"``), K CG iterations
    towards it, one independent CG per output unit (``"prox_cg<K>"``; K = 1 is the Cauchy step
    :math:`d_j = \\alpha_j g_j`, :math:`\\alpha_j = \\|g_j\\|^2 / (\\|A g_j\\|^2 +
    \\tau^{-1}\\|g_j\\|^2)`, one extra matmul :math:`A G`), or the gradient (``"gradient"``).

    bfloat16/float16 inputs and parameters: the forward pass and the input cotangent stay in
    the given dtype, the solve runs in float32 and the direction is cast back to each
    parameter's dtype (see the module docstring).

    Args:
      inputs: ``(..., in)``.
      kernel: ``(in, out)``.
      bias: ``(out,)`` or None.
      tau_prox: the proximal step size :math:`\\tau > 0` (may be traced).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"``.
      precision: matmul precision, as for ``jax.lax.dot_general``.

    Returns:
      ``(..., out)``, exactly the Dense layer's output.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, w, b = jnp.ones((4, 3)), jnp.ones((3, 2)), jnp.zeros(2)
      >>> loss = lambda w, b: proxprop_dense(x, w, b, tau_prox=0.5).sum()
      >>> d_w, d_b = jax.grad(loss, argnums=(0, 1))(w, b)
    """
    mode = solvers.parse_mode(optimization_mode)
    if kernel.ndim != 2 or inputs.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"kernel must have shape (in, out) with in = inputs.shape[-1] = {inputs.shape[-1]}, "
            f"got {kernel.shape}"
        )
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise ValueError(f"bias must have shape {kernel.shape[1:]}, got {bias.shape}")
    use_bias = bias is not None
    tau = _tau_array(tau_prox, kernel.dtype)
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)

    def forward(x, w, b):
        z = mm(x, w)
        return z + b if use_bias else z

    @jax.custom_vjp
    def op(x, w, b, tau):
        return forward(x, w, b)

    def fwd(x, w, b, tau):
        return forward(x, w, b), (x, w, b, tau)

    def bwd(res, g):
        x, w, b, tau = res
        g_x = mm(g, w.T)
        if mode.kind == "gradient":
            d_w, d_b = mm(x.T, g), (g.sum(0) if use_bias else None)
        else:  # the solve in (at least) float32
            x, g = _upcast((x, g))
            beta = (1 / tau).astype(x.dtype)
            if mode.kind == "prox_exact":
                d_w, d_b = solvers.dense_exact(x, g, beta, use_bias, precision)
            else:
                d_w, d_b = solvers.cg_solve(
                    lambda u: forward(x, *u),
                    lambda z: (mm(x.T, z), z.sum(0) if use_bias else None),
                    beta,
                    (mm(x.T, g), g.sum(0) if use_bias else None),
                    mode.cg_steps,
                    per_unit=True,
                )
        d_b = None if b is None else d_b.astype(b.dtype)
        return g_x.astype(x.dtype), d_w.astype(w.dtype), d_b, jnp.zeros_like(tau)

    op.defvjp(fwd, bwd)
    lead = inputs.shape[:-1]
    out = op(inputs.reshape(-1, inputs.shape[-1]), kernel, bias, tau)
    return out.reshape(*lead, kernel.shape[1])


def _linear_op(
    layer_fn: Callable[[PyTree, jax.Array], jax.Array],
    mode: solvers.Mode,
    per_unit: bool,
    exact: Callable[[PyTree, jax.Array, jax.Array, jax.Array], PyTree],
) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
    """The custom_vjp op ``(params, inputs, tau) -> layer_fn(params, inputs)``."""

    @jax.custom_vjp
    def op(params, x, tau):
        return layer_fn(params, x)

    def fwd(params, x, tau):
        return layer_fn(params, x), (params, x, tau)

    def bwd(res, g):
        params, x, tau = res
        _, pullback = jax.vjp(layer_fn, params, x)
        grad, g_x = pullback(g)
        if mode.kind == "gradient":
            direction = grad
        else:  # the solve in (at least) float32
            wide, x_w, g_w = _upcast((params, x, g))
            beta = 1 / tau.astype(jnp.promote_types(tau.dtype, jnp.float32))
            if mode.kind == "prox_exact":
                direction = exact(wide, x_w, g_w, beta)
            else:
                out, apply_a = jax.linearize(lambda p: layer_fn(p, x_w), wide)
                transpose = jax.linear_transpose(apply_a, wide)
                widened = [
                    a.dtype != b.dtype
                    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(params), strict=True)
                ]
                if any(widened):  # static: then the right-hand side in float32 as well
                    grad = transpose(g_w.astype(out.dtype))[0]
                direction = solvers.cg_solve(
                    lambda u: _upcast(apply_a(u)),
                    lambda z: transpose(z.astype(out.dtype))[0],
                    beta,
                    grad,
                    mode.cg_steps,
                    per_unit=per_unit,
                )
        direction = jax.tree.map(lambda d, p: d.astype(p.dtype), direction, params)
        return direction, g_x, jnp.zeros_like(tau)

    op.defvjp(fwd, bwd)
    return op


def _generic_exact(layer_fn: Callable):
    """Exact solve for a generic linear layer: the Gram matrix J^T J is built column by column
    (one jvp and one vjp per parameter), so it is only for small layers. The full system
    contains any per-unit blocks, so it serves both structures."""

    def exact(params, x, g, beta):
        flat, unravel = ravel_pytree(params)
        if flat.size > MAX_GENERIC_EXACT_SIZE:
            raise ValueError(
                f"optimization_mode='prox_exact' on a generic layer builds the full "
                f"{flat.size} x {flat.size} Gram matrix; that is above the limit of "
                f"{MAX_GENERIC_EXACT_SIZE} parameters: use 'prox_cg<K>' or a structured layer "
                "(ProxPropDense, ProxPropConv)"
            )
        _, pullback = jax.vjp(layer_fn, params, x)
        grad = ravel_pytree(pullback(g)[0])[0]
        _, apply_a = jax.linearize(lambda p: layer_fn(p, x), params)
        transpose = jax.linear_transpose(apply_a, params)
        column = lambda e: ravel_pytree(transpose(apply_a(unravel(e)))[0])[0]
        gram = jax.vmap(column)(jnp.eye(flat.size, dtype=flat.dtype))
        return unravel(solvers.damped_solve(gram, beta.astype(gram.dtype), grad))

    return exact


def proxprop_linear(
    layer_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    inputs: jax.Array,
    *,
    tau_prox: float | jax.Array = 1.0,
    optimization_mode: str = "prox_cg1",
    per_unit: bool = False,
) -> jax.Array:
    """``layer_fn(params, inputs)`` whose backward pass returns the ProxProp direction for
    ``params``, for any map linear in its parameters.

    The operator :math:`A^\\top A` is the Gauss-Newton product :math:`J_\\Theta^\\top J_\\Theta`
    of the layer map, applied matrix-free (a jvp, then its transpose); CG solves
    :math:`(J^\\top J + \\tau^{-1} I) d = \\nabla_\\Theta L` with all parameters as one vector
    (``per_unit=False``) or one system per output unit. ``"prox_exact"`` builds the full Gram
    matrix (layers of at most ``MAX_GENERIC_EXACT_SIZE`` parameters).

    bfloat16/float16 inputs and parameters: the forward pass and the input cotangent stay in
    the given dtype, the solve runs in float32 and the direction is cast back to each
    parameter's dtype (see the module docstring).

    Args:
      layer_fn: ``(params, inputs) -> outputs``, linear in ``params``.
      params: the parameter pytree.
      inputs: the layer input; its cotangent is the ordinary backprop one.
      tau_prox: the proximal step size :math:`\\tau > 0` (may be traced).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"``.
      per_unit: whether every parameter leaf's last axis and the output's last axis index
        independent output units (then one CG per unit).

    Returns:
      ``layer_fn(params, inputs)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> fn = lambda p, x: x @ p["w"]
      >>> params, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
      >>> d = jax.grad(lambda p: proxprop_linear(fn, p, x).sum())(params)
    """
    mode = solvers.parse_mode(optimization_mode)
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params must contain at least one array")
    dtype = jnp.result_type(*leaves)
    op = _linear_op(layer_fn, mode, per_unit, _generic_exact(layer_fn))
    return op(params, inputs, _tau_array(tau_prox, dtype))


def proxprop_conv(
    conv_fn: Callable[[jax.Array, jax.Array], jax.Array],
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    tau_prox: float | jax.Array = 1.0,
    optimization_mode: str = "prox_cg1",
    mask: jax.Array | None = None,
    grouped: bool = False,
) -> jax.Array:
    """``conv_fn(inputs, kernel * mask) + bias`` whose backward pass returns the ProxProp
    direction, one independent system per output channel.

    Output channel :math:`c` depends only on the filter ``kernel[..., c]`` and ``bias[c]``, so
    :math:`A^\\top A` is block-diagonal over channels; CG runs one system per channel
    (batched, matrix-free through ``conv_fn`` and its transpose). ``"prox_exact"`` unfolds the
    input patches :math:`P` (by convolving with an identity filter bank) and solves every
    channel's :math:`([P, 1]^\\top [P, 1] + \\tau^{-1} I) d_c = g_c` with one Cholesky factor.

    bfloat16/float16 inputs and parameters: the forward pass and the input cotangent stay in
    the given dtype, the solve runs in float32 and the direction is cast back to each
    parameter's dtype (see the module docstring).

    Args:
      conv_fn: ``(inputs, kernel) -> outputs``, channels last, linear in ``kernel`` of shape
        ``(*window, in, out)``; it must accept any number of output channels (e.g. a
        ``lax.conv_general_dilated`` call or an unbiased ``nn.Conv`` apply).
      inputs: the layer input.
      kernel: ``(*window, in, out)``.
      bias: ``(out,)`` or None.
      tau_prox: the proximal step size :math:`\\tau > 0` (may be traced).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"``.
      mask: an optional 0/1 array of the kernel's shape (as ``nn.Conv(mask=...)``).
      grouped: whether ``conv_fn`` uses a feature group count above 1 (not with prox_exact).

    Returns:
      The convolution's output.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> conv = lambda x, k: jax.lax.conv_general_dilated(
      ...     x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> x, k = jnp.ones((2, 5, 5, 1)), jnp.ones((3, 3, 1, 4))
      >>> d = jax.grad(lambda k: proxprop_conv(conv, x, k).sum())(k)
    """
    mode = solvers.parse_mode(optimization_mode)
    if mode.kind == "prox_exact" and (mask is not None or grouped):
        raise ValueError(
            "optimization_mode='prox_exact' needs a convolution without mask and with "
            "feature_group_count=1 (all channels share the unfolded patches); use 'prox_cg<K>'"
        )
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}

    def layer_fn(p, x):
        z = conv_fn(x, p["kernel"] if mask is None else p["kernel"] * mask)
        return z + p["bias"] if "bias" in p else z

    def exact(p, x, g, beta):
        window = p["kernel"].shape[:-1]
        size = math.prod(window)
        identity = jnp.eye(size, dtype=p["kernel"].dtype).reshape(*window, size)
        patches = conv_fn(x, identity).reshape(-1, size)
        out = p["kernel"].shape[-1]
        d_w, d_b = solvers.dense_exact(patches, g.reshape(-1, out), beta, "bias" in p)
        d = {"kernel": d_w.reshape(p["kernel"].shape)}
        return d if d_b is None else {**d, "bias": d_b}

    tau = _tau_array(tau_prox, kernel.dtype)
    return _linear_op(layer_fn, mode, True, exact)(params, inputs, tau)


def check_linear(
    layer_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    inputs: jax.Array,
    *,
    name: str = "layer",
    seed: int = 0,
) -> None:
    """Raises a ValueError unless ``layer_fn`` is linear in ``params``.

    Two checks: the map must be transposable in ``params`` (``jax.linear_transpose`` fails on
    non-linear primitives such as ``tanh``); and, on random probe parameters and inputs of the
    given shapes, :math:`f(0) = 0` and :math:`f(a + 2b) = f(a) + 2 f(b)`, which catches affine
    and quadratic maps. The numerical probe runs eagerly even under a trace.
    """
    try:
        out = jax.eval_shape(layer_fn, params, inputs)
        jax.eval_shape(
            lambda p, x, z: jax.linear_transpose(lambda q: layer_fn(q, x), p)(z),
            params,
            inputs,
            out,
        )
    except (NotImplementedError, AssertionError, TypeError, ValueError) as err:
        raise ValueError(
            f"ProxProp needs a layer that is linear in its parameters; {name} is not "
            f"(its map cannot be transposed in the parameters: {type(err).__name__}: {err})"
        ) from None
    rng = np.random.default_rng(seed)

    def probe(tree):
        return jax.tree.map(
            lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
            jax.eval_shape(lambda t: t, tree),
        )

    with jax.ensure_compile_time_eval():
        x = probe(inputs)
        a, b = probe(params), probe(params)
        combo = jax.tree.map(lambda u, v: u + 2 * v, a, b)
        zero = jax.tree.map(jnp.zeros_like, a)
        f_combo, f_a, f_b, f_zero = (layer_fn(p, x) for p in (combo, a, b, zero))
        scale = float(jnp.max(jnp.abs(f_a)) + jnp.max(jnp.abs(f_b)) + 1e-6)
        error = max(
            float(jnp.max(jnp.abs(f_combo - f_a - 2 * f_b))),
            float(jnp.max(jnp.abs(f_zero))),
        )
    if not error <= 1e-3 * scale:
        raise ValueError(
            f"ProxProp needs a layer that is linear in its parameters; {name} is not: on a "
            f"random probe, f(a + 2b) - f(a) - 2 f(b) or f(0) reaches {error:.3g} "
            f"(output scale {scale:.3g})"
        )
