"""Passing the extra arguments of ``update`` (``value=``, ``value_fn=``, ``curvature=``,
``factors=``) through code that calls ``tx.update`` for you.

* :class:`TrainState`: flax linen's ``TrainState`` whose ``apply_gradients`` forwards extra
  keyword arguments to ``tx.update``.
* :func:`bind_extra_args`: a transformation whose ``update`` always receives given extra
  arguments, for wrappers that drop them (``optax.lookahead``).

``flax.nnx.Optimizer.update(model, grads, **kwargs)`` already forwards its keyword arguments
to ``tx.update``: ``optimizer.update(model, grads, value=loss)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax.training import train_state


def bind_extra_args(
    tx: optax.GradientTransformation, **extra_args: Any
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` always gets ``extra_args`` (those passed to a call are added).

    ``init`` is ``tx.init`` and the state is ``tx``'s, so a transformation bound afresh inside
    every (jitted) step, to that step's loss, carries the same state from step to step.

    Args:
      tx: any optax transformation; one without extra-argument support ignores them.
      **extra_args: keyword arguments for ``tx.update``, e.g. ``value=loss``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. A keyword given both here and to
      ``update`` is an error (``TypeError``), so neither value is silently dropped.

    Example:
      >>> import jax.numpy as jnp, optax, jaxopt_suite
      >>> fast = jaxopt_suite.alig(max_lr=0.1)
      >>> params = optax.LookaheadParams.init_synced({"w": jnp.ones(2)})
      >>> tx = optax.lookahead(bind_extra_args(fast, value=jnp.float32(2.0)), 5, 0.5)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **more):
        clash = sorted(set(more) & set(extra_args))
        if clash:
            raise TypeError(f"bind_extra_args: {clash} are bound already and passed again")
        return tx.update(updates, state, params, **extra_args, **more)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


class TrainState(train_state.TrainState):
    """Flax linen's ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

    ``state.apply_gradients(grads=grads, value=loss)`` calls
    ``tx.update(grads, opt_state, params, value=loss)``: keyword arguments named like a field
    of the state (``step``, ``params``, a subclass's ``batch_stats``) replace that field as in
    flax; every other keyword goes to ``tx.update``. Everything else is flax's
    ``apply_gradients`` (step count, ``optax.apply_updates``).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_suite
      >>> model = nn.Dense(1)
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> state = TrainState.create(apply_fn=model.apply,
      ...     params=model.init(jax.random.key(0), x)["params"], tx=jaxopt_suite.alig(0.1))
      >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
      >>> value, grads = jax.value_and_grad(loss)(state.params)
      >>> state = state.apply_gradients(grads=grads, value=value)
    """

    def apply_gradients(self, *, grads, **kwargs):
        fields = {f.name for f in dataclasses.fields(self)}
        replace = {k: v for k, v in kwargs.items() if k in fields}
        extra = {k: v for k, v in kwargs.items() if k not in fields}
        bound = self.replace(tx=bind_extra_args(self.tx, **extra))
        new = train_state.TrainState.apply_gradients(bound, grads=grads, **replace)
        return new.replace(tx=self.tx)
