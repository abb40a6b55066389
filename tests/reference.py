"""The tests' one brute-force reference for curvature quantities.

Everything here is plain JAX autodiff on tiny problems and never calls the library's engine
(``jaxopt_suite.curvature``), its rules or its losses: per-sample gradients by ``jax.grad`` of
each sample's loss term in a loop over samples (``jax.lax.map``), per-sample GGN blocks
``Jᵀ H J`` from ``jax.jacrev`` of the model on one sample and ``jax.hessian`` of the loss
written below, per-sample Hessian diagonals from ``jax.hessian`` of the sample's term.

The losses follow PyTorch / BackPACK: a batch's loss is the sum of per-sample terms (each
summed over the sample's positions or entries) divided, for ``reduction="mean"``, by N·T for
cross-entropy over T positions (N without positions), by N·D for mse and bce_with_logits, by N
for a callable per-sample loss.

Entry points, all with one signature ``(apply_fn, params, x, y, loss, reduction)``:

- :func:`quantities`: a dict of the engine's exact quantities (value, gradient, first-order
  statistics, GGN and Hessian diagonals, GGN matrices and per-leaf blocks);
- :func:`per_sample`: the raveled per-sample arrays they are made of;
- :func:`ggn_matrix`, :func:`ggn_blocks`: the batch GGN, whole and per parameter leaf;
- :func:`hessian_matrix`: the batch loss's full Hessian.

And shared helpers: :func:`batch_loss`, :func:`per_sample_loss`, :func:`normaliser`,
:func:`flat`, :func:`leaf_slices`, :func:`leaf_blocks`, :func:`square_root_gram`,
:func:`random_like`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

FAST_COMPILE = {"xla_backend_optimization_level": 0}

# --- losses, written independently of jaxopt_suite.curvature.losses --------------------------


def cross_entropy_one(out, y):
    """One sample: logits ``(..., C)``, integer labels ``(...)``; summed over positions."""
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0])


def mse_one(out, y):
    return jnp.sum((out - y) ** 2)


def bce_with_logits_one(out, y):
    """-y log σ(out) - (1 - y) log(1 - σ(out)) = softplus(out) - y out, summed."""
    return jnp.sum(jax.nn.softplus(out) - y * out)


PER_SAMPLE = {
    "cross_entropy": cross_entropy_one,
    "mse": mse_one,
    "bce_with_logits": bce_with_logits_one,
}


def per_sample_loss(loss):
    """A named loss's per-sample term, or the callable itself (``(out, y) -> scalar`` on one
    sample's output, without the batch axis)."""
    if callable(loss):
        return loss
    return PER_SAMPLE[loss]


def normaliser(loss, out_shape, reduction="mean"):
    """What a batch's summed terms are divided by: 1 for ``"sum"``; for ``"mean"`` N·T for
    cross-entropy (T positions), N·D for mse and bce_with_logits, N for a callable."""
    if reduction == "sum":
        return 1
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if loss == "cross_entropy":
        return int(np.prod(out_shape[:-1]))
    if loss in ("mse", "bce_with_logits"):
        return int(np.prod(out_shape))
    return int(out_shape[0])


def batch_loss(loss, reduction="mean"):
    """``(outputs (N, ...), targets) -> scalar``: the batch loss with PyTorch's normalisers."""
    one = per_sample_loss(loss)

    def fn(out, y):
        return jnp.sum(jax.vmap(one)(out, y)) / normaliser(loss, out.shape, reduction)

    return fn


# --- brute force ------------------------------------------------------------------------------


def per_sample(apply_fn, params, x, y, loss, reduction="mean", *, full_ggn=False, hessian=False):
    """Raveled (``ravel_pytree`` order) per-sample arrays, float64 numpy, by a loop over samples:

    ``value`` (the batch loss), ``grads`` (N, P) (each sample's term of the batch loss),
    ``ggn_diag`` (N, P) (diagonal of ``Jₙᵀ Hₙ Jₙ``), and with ``full_ggn`` ``ggn`` (N, P, P),
    with ``hessian`` ``hessian_diag`` (N, P) (diagonal of ``jax.hessian`` of the term).

    ``apply_fn(params, x)`` must treat samples independently (it is called on one at a time).
    """
    one = per_sample_loss(loss)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, x, y):
        flat_params, unravel = ravel_pytree(params)
        c = 1.0 / normaliser(loss, jax.eval_shape(apply_fn, params, x).shape, reduction)
        f_one = lambda v, xn: apply_fn(unravel(v), xn[None])[0]

        def sample(xy):
            xn, yn = xy
            term = lambda v: c * one(f_one(v, xn), yn)
            out = f_one(flat_params, xn)
            jac = jax.jacrev(f_one)(flat_params, xn).reshape(out.size, flat_params.size)
            h_out = jax.hessian(lambda o: c * one(o.reshape(out.shape), yn))(out.reshape(-1))
            found = {"value": term(flat_params), "grads": jax.grad(term)(flat_params)}
            if full_ggn:
                found["ggn"] = jac.T @ h_out @ jac
                found["ggn_diag"] = jnp.diagonal(found["ggn"])
            else:
                found["ggn_diag"] = jnp.einsum("dp,de,ep->p", jac, h_out, jac)
            if hessian:
                found["hessian_diag"] = jnp.diagonal(jax.hessian(term)(flat_params))
            return found

        return jax.lax.map(sample, (x, y))

    found = {k: np.asarray(v, np.float64) for k, v in run(params, x, y).items()}
    found["value"] = float(found["value"].sum())
    return found


def quantities(apply_fn, params, x, y, loss, reduction="mean", *, full_ggn=False, hessian=False):
    """Every exact quantity, by brute force (:func:`per_sample`), as float64 numpy.

    Trees shaped like ``params`` (per-sample ones with a leading N axis, as the engine returns
    them): ``grad``, ``grad_batch``, ``batch_l2`` (N,) per leaf, ``sum_grad_squared``,
    ``variance``, ``diag_ggn_exact``, ``diag_ggn_exact_batch``; with ``hessian`` also
    ``diag_h``, ``diag_h_batch``. ``value``: the batch loss. With ``full_ggn`` also the
    raveled GGN ``ggn`` (P, P), per sample ``ggn_batch`` (N, P, P), and ``ggn_blocks``: a tree
    of each leaf's diagonal block of ``ggn`` (size, size).
    """
    ref = per_sample(apply_fn, params, x, y, loss, reduction, full_ggn=full_ggn, hessian=hessian)
    g = ref["grads"]
    n = g.shape[0]
    sgs = (g**2).sum(0)
    out = {
        "value": ref["value"],
        "grad": unflat(params, g.sum(0)),
        "grad_batch": unflat(params, g, lead=1),
        "batch_l2": jax.tree.unflatten(
            jax.tree.structure(params),
            [(g[:, w] ** 2).sum(1) for w in leaf_slices(params)],
        ),
        "sum_grad_squared": unflat(params, sgs),
        "variance": unflat(params, sgs / n - (g.sum(0) / n) ** 2),
        "diag_ggn_exact": unflat(params, ref["ggn_diag"].sum(0)),
        "diag_ggn_exact_batch": unflat(params, ref["ggn_diag"], lead=1),
    }
    if hessian:
        out["diag_h"] = unflat(params, ref["hessian_diag"].sum(0))
        out["diag_h_batch"] = unflat(params, ref["hessian_diag"], lead=1)
    if full_ggn:
        out["ggn_batch"] = ref["ggn"]
        out["ggn"] = ref["ggn"].sum(0)
        out["ggn_blocks"] = leaf_blocks(params, out["ggn"])
    return out


def ggn_matrix(apply_fn, params, x, y, loss, reduction="mean"):
    """The batch GGN ``Σₙ Jₙᵀ Hₙ Jₙ`` (P, P) on the raveled parameters."""
    return per_sample(apply_fn, params, x, y, loss, reduction, full_ggn=True)["ggn"].sum(0)


def hessian_matrix(apply_fn, params, x, y, loss, reduction="mean"):
    """The batch loss's full Hessian (P, P) on the raveled parameters, by ``jax.hessian``."""
    flat_params, unravel = ravel_pytree(params)
    batch = batch_loss(loss, reduction)
    fn = jax.jit(jax.hessian(lambda v: batch(apply_fn(unravel(v), x), y)))
    return np.asarray(fn(flat_params), np.float64)


def ggn_blocks(apply_fn, params, x, y, loss, reduction="mean"):
    """Each parameter leaf's diagonal block of the batch GGN (its entries row-major)."""
    return leaf_blocks(params, ggn_matrix(apply_fn, params, x, y, loss, reduction))


# --- raveling -------------------------------------------------------------------------------


def leaf_slices(params):
    """Where each leaf sits in the raveled parameters (``ravel_pytree``'s leaf order)."""
    sizes = [int(np.prod(np.shape(a))) for a in jax.tree.leaves(params)]
    ends = np.cumsum(sizes)
    return [slice(int(e) - s, int(e)) for s, e in zip(sizes, ends, strict=True)]


def leaf_blocks(params, matrix):
    """Per-leaf diagonal blocks of a raveled (P, P) matrix, as a tree like ``params``."""
    matrix = np.asarray(matrix)
    blocks = [matrix[w, w] for w in leaf_slices(params)]
    return jax.tree.unflatten(jax.tree.structure(params), blocks)


def flat(tree, lead=0):
    """Ravel a tree whose leaves carry ``lead`` leading axes: (*lead, P) float64."""
    leaves = jax.tree.leaves(tree)
    shape = np.shape(leaves[0])[:lead]
    return np.concatenate([np.asarray(a, np.float64).reshape(*shape, -1) for a in leaves], axis=-1)


def unflat(params, array, lead=0):
    """The inverse of :func:`flat`: a tree like ``params`` from (*lead, P)."""
    array = np.asarray(array)
    shape = array.shape[:lead]
    leaves = [
        array[..., w].reshape((*shape, *np.shape(a)))
        for w, a in zip(leaf_slices(params), jax.tree.leaves(params), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def square_root_gram(columns, per_sample=True):
    """``Σₖ Vₖ Vₖᵀ`` from square-root columns V (K, N, P): per sample (N, P, P), or summed over
    samples (P, P)."""
    columns = np.asarray(columns, np.float64)
    if per_sample:
        return np.einsum("knp,knq->npq", columns, columns)
    return np.einsum("knp,knq->pq", columns, columns)


# --- small shared helpers -------------------------------------------------------------------


def random_like(tree, seed=0, *, std=None, vector_fan_in=4, dtype=None):
    """numpy normal draws shaped like ``tree`` (flax's initialisers would cost compilations).

    Standard deviation ``std``, or without it ``fan_in ** -0.5`` with fan_in the product of all
    but the last axis (``vector_fan_in`` for 1-D leaves). ``dtype``: the leaves' own by default.
    """
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if std is None:
            fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else vector_fan_in
            scale = fan_in**-0.5
        else:
            scale = std
        return jnp.asarray(rng.normal(0.0, scale, leaf.shape), dtype or leaf.dtype)

    return jax.tree.map(draw, tree)
