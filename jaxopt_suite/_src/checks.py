"""Input checks shared by the optax transformations of the library."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite._typing import PyTree


def _dtype(x) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(x)


def check_floating(tree: PyTree, argument: str, method: str) -> None:
    """Raises a TypeError naming every leaf of ``tree`` that is not a real floating array.

    A gradient step on an integer or boolean parameter either rounds to no step at all (the
    update is cast to the parameter's dtype) or meets ``jax.grad``'s ``float0`` gradients, so
    such a tree would train silently wrong; it is refused at trace time instead. Leaves that
    ``optax.masked`` has masked out (``optax.MaskedNode``) are not leaves and are never checked.

    Args:
      tree: the parameters or updates passed to the transformation.
      argument: the argument's name in the error (``"params"``, ``"updates"``).
      method: the transformation's name in the error.
    """
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = _dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            name = "float0" if dtype == jax.dtypes.float0 else dtype.name
            bad.append(f"{jax.tree_util.keystr(path) or '<root>'} ({name})")
    if bad:
        raise TypeError(
            f"{method}: every leaf of {argument} must be a real floating-point array, but "
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not. A gradient step cannot "
            "move an integer or boolean parameter (the update would round to nothing). Cast "
            "trainable leaves to a float dtype, or keep non-trainable ones out of the tree the "
            "optimizer sees (a flax variable collection other than 'params', or "
            "optax.multi_transform with optax.set_to_zero() for them)."
        )


def _is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: PyTree) -> bool:
    """True when ``tree`` is a tree that ``optax.masked`` has cut (some entries are
    ``optax.MaskedNode`` placeholders)."""
    return any(_is_masked_node(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked_node))
