r"""Random directions of the forward gradient: dense or rank-one, normal or random signs.

Directions (``distribution`` x ``structure``), for :math:`n` parameters in total; the variance
is the total one, :math:`\mathbb{E}\|g - \nabla f\|^2`, for ``K = 1``:

* ``dense`` / ``normal``: i.i.d. :math:`N(0, 1)` entries (the paper's);
  :math:`(n + 1)\|\nabla f\|^2`.
* ``dense`` / ``rademacher``: i.i.d. signs, 32 per random ``uint32`` word;
  :math:`(n - 1)\|\nabla f\|^2`.
* ``rank_one`` / ``rademacher``: per leaf :math:`a \otimes b` of signs;
  :math:`(n - 1)\|\nabla f\|^2` (as dense signs: :math:`\|v\|^2 = n` in both).
* ``rank_one`` / ``normal``: per leaf :math:`a \otimes b` of normals; for one ``(p, q)`` leaf
  :math:`((p + 2)(q + 2) - 1)\|\nabla f\|^2`, a little above dense normals.

``perturb="one_layer"`` perturbs ONE random layer ``l`` per direction (probability
:math:`p_l`, uniform or proportional to its size :math:`n_l`), its entries scaled by
:math:`1/\sqrt{p_l}`: :math:`\mathbb{E}[v v^\top] = \sum_l p_l \, p_l^{-1} I_l = I`, so the
estimate stays unbiased, with total variance :math:`\sum_l c_l \|\nabla_l f\|^2 / p_l -
\|\nabla f\|^2` (:math:`c_l = n_l` for signs; :math:`n_l + 2` for dense normals). For signs
with :math:`p_l \propto n_l` that is :math:`(n - 1)\|\nabla f\|^2`, exactly the variance of
perturbing every layer; uniform :math:`p_l = 1/L` gives
:math:`L \sum_l n_l \|\nabla_l f\|^2 - \|\nabla f\|^2`. Its use is speed: the tangent starts
at the chosen layer, and the full matrix products that carry a tangent through later layers
run under ``lax.cond`` only when an earlier layer is the perturbed one (for the MLP
784-1024-1024-10, the only such product is layer 1's tangent through layer 2).

``rank_one`` directions draw, for a leaf of shape ``(..., m)``, one vector :math:`a` over the
leading axes and one :math:`b` over the last axis (vectors and scalars stay dense). Entries
:math:`a_i b_j` are uncorrelated with unit variance, so :math:`\mathbb{E}[v v^\top] = I` still
holds and the estimate stays unbiased. Its use is speed: a Dense kernel's tangent term
:math:`x (a b^\top) = (x a) b^\top` and a convolution's ``conv(x, a ⊗ b) = conv(x, a) ⊗ b`` cost a
matrix-vector product instead of a second matrix product; :mod:`jaxopt_suite.fwdgrad.interpreter`
applies those identities, and only ``jax.jvp`` differentiates anything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite._typing import PyTree

DISTRIBUTIONS = ("normal", "rademacher")
STRUCTURES = ("dense", "rank_one")
PERTURB = ("all", "one_layer")
LAYER_PROBABILITIES = ("uniform", "size")


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


class RankOne(NamedTuple):
    """A rank-one direction for one leaf: ``a[..., None] * b`` (``a``: leaf.shape[:-1], ``b``:
    leaf.shape[-1:]), kept factored so that linear layers can use it cheaply."""

    a: jax.Array
    b: jax.Array

    def dense(self) -> jax.Array:
        return self.a[..., None] * self.b


def rademacher(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    r"""I.i.d. random signs :math:`\pm 1`, unpacked 32 per random ``uint32`` word.

    Every bit of ``jax.random.bits`` is an independent fair coin, so this draws 32x fewer random
    words than ``jax.random.rademacher`` (one word per sign) and costs a shift and a mask per sign.

    Args:
      key: a PRNG key (any implementation).
      shape: shape of the result.
      dtype: floating dtype of the result.

    Returns:
      An array of ``shape`` with entries ``+1`` or ``-1`` with probability 1/2 each.
    """
    size = math.prod(shape)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    signs = 1 - 2 * bits.reshape(-1)[:size].astype(dtype)
    return signs.reshape(shape)


def _materialise(x: jax.Array) -> jax.Array:
    """``x`` itself (1-D), computed as ``x @ I`` in blocks of 32 (exact: every product is with
    1 or 0), so that XLA stores it once: it does not fuse a matrix product into its consumers,
    and the CPU compiler drops optimization barriers before fusion."""
    n = x.shape[0]
    blocks = jnp.pad(x, (0, -n % 32)).reshape(-1, 32)
    eye = jnp.eye(32, dtype=x.dtype)
    return jnp.matmul(blocks, eye, precision=jax.lax.Precision.HIGHEST).reshape(-1)[:n]


def _direction(key: jax.Array, tree: PyTree, distribution: str, structure: str) -> PyTree:
    """A direction shaped like ``tree``; rank-one leaves stay :class:`RankOne`.

    All the random numbers come from ONE draw, sliced per leaf: a single generator call costs far
    less than one per leaf (each is a separate small kernel with its own key split).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtype = jnp.result_type(*leaves)
    pieces = []  # (leaf index, shape) of each block of random numbers
    for i, leaf in enumerate(leaves):
        shape = jnp.shape(leaf)
        if structure == "rank_one" and len(shape) >= 2:
            pieces += [(i, shape[:-1]), (i, shape[-1:])]
        else:
            pieces.append((i, shape))
    total = sum(math.prod(shape) for _, shape in pieces)
    if distribution == "normal":
        flat = jax.random.normal(key, (total,), dtype)
    else:
        flat = rademacher(key, (total,), dtype)
    if structure == "rank_one":
        # Store the factors once: otherwise XLA recomputes each entry (bit unpacking, slicing)
        # inside every fusion that broadcasts it, i.e. once per parameter of the estimate
        # a ⊗ b (the MLP's update fusions were 4x slower). Dense draws are used elementwise.
        flat = _materialise(flat)
    blocks: list[list[jax.Array]] = [[] for _ in leaves]
    offset = 0
    for i, shape in pieces:
        size = math.prod(shape)
        block = flat[offset : offset + size].reshape(shape).astype(jnp.result_type(leaves[i]))
        blocks[i].append(block)
        offset += size
    out = [RankOne(*b) if len(b) == 2 else b[0] for b in blocks]
    return jax.tree.unflatten(treedef, out)


def _densify(direction: PyTree) -> PyTree:
    return jax.tree.map(
        lambda d: d.dense() if isinstance(d, RankOne) else d,
        direction,
        is_leaf=lambda d: isinstance(d, RankOne),
    )


def random_direction(
    key: jax.Array, tree: PyTree, distribution: str = "normal", structure: str = "dense"
) -> PyTree:
    r"""A random direction :math:`v` shaped like ``tree`` with :math:`\mathbb{E}[v v^\top] = I`.

    Args:
      key: a PRNG key.
      tree: a pytree of floating arrays (only shapes and dtypes are used).
      distribution: ``"normal"`` or ``"rademacher"``.
      structure: ``"dense"`` (i.i.d. entries) or ``"rank_one"`` (``a ⊗ b`` per leaf of rank >= 2).

    Returns:
      A pytree of dense arrays like ``tree``.

    Example:
      >>> v = random_direction(jax.random.key(0), {"w": jnp.zeros((3, 2))}, "rademacher")
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("structure", structure, STRUCTURES)
    return _densify(_direction(key, tree, distribution, structure))


def _layers(diff: tuple) -> tuple[list[int], list[int]]:
    """Layer index of every leaf of ``diff`` (a tuple of differentiated arguments) and the
    number of parameters of each layer: a layer is one top-level entry of an argument (a flax
    layer in ``{"params": ...}``-free parameter dicts such as ``{"Dense_0": {...}, ...}``), or
    the whole argument when it is a single array."""
    ids: dict[Any, int] = {}
    layer_of, sizes = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(diff)[0]:
        if path[:2] not in ids:
            ids[path[:2]] = len(ids)
            sizes.append(0)
        layer_of.append(ids[path[:2]])
        sizes[ids[path[:2]]] += math.prod(jnp.shape(leaf))
    return layer_of, sizes


def _one_layer_direction(key, diff, distribution, structure, layer_probabilities):
    """A direction that perturbs one random layer ``l`` (probability ``p_l``) scaled by
    ``1/sqrt(p_l)``, so that ``E[v vᵀ] = sum_l p_l (1/p_l) I_l = I``. Returns the direction, the
    layer set of every leaf and ``gate(set) -> traced bool | None``, whether the chosen layer is
    in the set (None: always)."""
    layer_of, sizes = _layers(diff)
    if layer_probabilities == "size" and sum(sizes) > 0:
        probs = np.asarray(sizes, np.float64) / sum(sizes)
    else:
        probs = np.full(len(sizes), 1.0 / len(sizes))
    layer_key, direction_key = jax.random.split(key)
    layer = jax.random.choice(layer_key, len(sizes), p=jnp.asarray(probs, jnp.float32))
    # an empty layer has p_l = 0 under "size" and is never drawn: its scale is never read
    inverse_root = np.divide(1.0, np.sqrt(probs), out=np.zeros_like(probs), where=probs > 0)
    scale = jnp.asarray(inverse_root, jnp.float32)[layer]
    v = _direction(direction_key, diff, distribution, structure)
    is_rank_one = lambda d: isinstance(d, RankOne)
    leaves, treedef = jax.tree.flatten(v, is_leaf=is_rank_one)
    scaled = []
    for d, i in zip(leaves, layer_of, strict=True):
        m = jnp.where(layer == i, scale, 0.0)
        if is_rank_one(d):
            scaled.append(RankOne(d.a * m.astype(d.a.dtype), d.b))
        else:
            scaled.append(d * m.astype(d.dtype))

    def gate(layers: frozenset) -> jax.Array | None:
        if len(layers) == len(sizes):
            return None
        return jnp.any(jnp.asarray(sorted(layers)) == layer)

    deps = [frozenset({i}) for i in layer_of]
    return jax.tree.unflatten(treedef, scaled), deps, gate
