"""Extra arguments of ``update`` through flax's train states and optax's lookahead: each path
gives exactly the updates of calling ``tx.update`` directly with the same arguments."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_suite
from jaxopt_suite import bind_extra_args, train_state

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)), jnp.float32)


def curvature_of(grads):
    """Any positive tree shaped like the gradient stands in for a curvature diagonal."""
    return jax.tree.map(lambda g: g**2 + 0.5, grads)


def direct_step(tx, params, loss):
    """The reference: ``tx.update`` called by hand, every extra argument given."""
    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(
        grads, tx.init(params), params, value=value, value_fn=loss, curvature=curvature_of(grads)
    )
    return optax.apply_updates(params, updates)


TRANSFORMS = {
    "alig": lambda: jaxopt_suite.alig(max_lr=0.5, momentum=0.9),
    "forward_gradient": lambda: optax.chain(
        jaxopt_suite.forward_gradient(jax.random.key(7)), optax.sgd(0.1)
    ),
    "diag_ggn_sgd": lambda: jaxopt_suite.diag_ggn_sgd(0.1),
}


class StateWithStats(train_state.TrainState):
    batch_stats: dict


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_linen_train_state_forwards_extra_arguments(name):
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), X)["params"]
    loss = lambda p: jnp.mean((model.apply({"params": p}, X) - Y) ** 2)
    state = StateWithStats.create(
        apply_fn=model.apply, params=params, tx=TRANSFORMS[name](), batch_stats={"n": 0}
    )

    @jax.jit
    def step(state):
        value, grads = jax.value_and_grad(loss)(state.params)
        # batch_stats is a field (replaced, as in flax); value and value_fn go to tx.update
        return state.apply_gradients(
            grads=grads,
            value=value,
            value_fn=loss,
            curvature=curvature_of(grads),
            batch_stats={"n": 1},
        )

    new = step(state)
    expected = direct_step(TRANSFORMS[name](), params, loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.params, expected)
    assert int(new.step) == 1 and new.batch_stats == {"n": 1}
    assert new.tx is state.tx


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_optimizer_forwards_extra_arguments(name):
    """``nnx.Optimizer.update(model, grads, **kwargs)`` passes kwargs to ``tx.update``;
    value_fn receives the parameters' pure state, so it merges them back into the model."""
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.as_pure(params)
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(X) - Y) ** 2)
    expected = direct_step(TRANSFORMS[name](), pure, loss)
    optimizer = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
        curvature = curvature_of(nnx.as_pure(grads))
        optimizer.update(model, grads, value=value, value_fn=loss, curvature=curvature)

    step(model, optimizer)
    new = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, expected)


def test_lookahead_drops_extra_arguments_and_bind_extra_args_restores_them():
    """optax.lookahead calls its fast optimizer without extra arguments: AliG then misses
    value=. Bound afresh in each step, the fast optimizer gets the step's loss; its fast
    parameters move exactly by AliG's own update and the state carries over between steps."""
    params = {"w": jnp.array([1.0, -2.0])}
    loss = lambda p: jnp.sum(p["w"] ** 2)
    fast = jaxopt_suite.alig(max_lr=0.3)
    plain = optax.lookahead(fast, sync_period=3, slow_step_size=0.5)
    synced = optax.LookaheadParams.init_synced(params)
    value, grads = jax.value_and_grad(loss)(params)
    with pytest.raises(TypeError, match="value="):
        plain.update(grads, plain.init(synced), synced)

    @jax.jit
    def step(lookahead_params, opt_state):
        value, grads = jax.value_and_grad(loss)(lookahead_params.fast)
        tx = optax.lookahead(bind_extra_args(fast, value=value), 3, 0.5)
        updates, opt_state = tx.update(grads, opt_state, lookahead_params)
        return optax.apply_updates(lookahead_params, updates), opt_state

    new, opt_state = step(synced, plain.init(synced))
    alone, _ = fast.update(grads, fast.init(params), params, value=value)
    np.testing.assert_allclose(new.fast["w"], params["w"] + alone["w"], rtol=1e-6)
    np.testing.assert_array_equal(new.slow["w"], params["w"])
    assert int(opt_state.fast_state.alig.skipped) == 0
    with pytest.raises(TypeError, match=r"\['value'\] are bound already"):
        bind_extra_args(fast, value=value).update(grads, fast.init(params), params, value=value)
