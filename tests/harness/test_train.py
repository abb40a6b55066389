import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import data, train, zoo


def _problem():
    model = zoo.MLP(hidden=(8,), num_classes=3)
    params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
    return train.Problem(lambda p, x: model.apply({"params": p}, x)), params


def _batch(n=6):
    images = np.asarray(jax.random.randint(jax.random.key(1), (n, 4, 4), 0, 256), np.uint8)
    labels = np.asarray(jax.random.randint(jax.random.key(2), (n,), 0, 3), np.int32)
    return images, labels


def test_cross_entropy_matches_log_softmax():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = jnp.array([1, 2])
    manual = -np.mean(
        [
            np.log(np.exp(2.0) / np.exp([1.0, 2.0, 0.5]).sum()),
            np.log(np.exp(3.0) / np.exp([0.0, -1.0, 3.0]).sum()),
        ]
    )
    assert np.isclose(train.cross_entropy(logits, labels), manual, rtol=1e-6)


def test_step_is_the_sgd_update_by_hand():
    problem, params = _problem()
    images, labels = _batch()
    tx = optax.sgd(0.5)
    state = train.init_state(params, tx, jax.random.key(3))
    step = train.jit_step(train.make_step(problem, tx))
    x = data.normalize(images)
    value, grads = jax.value_and_grad(problem.loss_fn)(params, x, labels)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    new_state, loss = step(state, images, labels)
    assert np.isclose(loss, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1 and int(new_state.skipped) == 0


def test_non_finite_loss_leaves_parameters_untouched():
    problem, params = _problem()
    images, labels = _batch()
    tx = optax.adam(1e-2)
    state = train.init_state(params, tx, jax.random.key(3))
    poison = lambda imgs: data.normalize(imgs) * jnp.nan
    step = train.jit_step(train.make_step(problem, tx, preprocess=poison))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    new_state, loss = step(state, images, labels)
    assert not np.isfinite(loss)
    assert int(new_state.skipped) == 1 and int(new_state.step) == 1
    after = (new_state.params, new_state.opt_state)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_extra_kwargs_reach_the_transformation():
    seen = {}

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, value, **extra):
        seen["value"] = value
        return jax.tree.map(jnp.zeros_like, updates), state

    tx = optax.GradientTransformationExtraArgs(init, update)
    problem, params = _problem()
    images, labels = _batch()
    step = train.make_step(problem, tx)
    _, loss = step(train.init_state(params, tx, jax.random.key(0)), images, labels)
    assert np.isclose(seen["value"], loss)


def test_step_compiles_once():
    traces = []
    problem, params = _problem()

    def counting_loss(p, x):
        traces.append(1)
        return problem.apply_fn(p, x)

    tx = optax.sgd(0.1)
    step = train.jit_step(train.make_step(train.Problem(counting_loss), tx))
    state = train.init_state(params, tx, jax.random.key(0))
    images, labels = _batch()
    for _ in range(3):
        state, _ = step(state, images, labels)
    assert len(traces) == 1


def test_fit_trains_and_evaluates():
    ds = data.synthetic(jax.random.key(0), num_train=64, num_test=32, num_classes=3)
    model = zoo.MLP(hidden=(16,), num_classes=3)
    params = zoo.init_params(model, jax.random.key(1))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    tx = optax.sgd(0.1)
    step = train.jit_step(train.make_step(problem, tx))
    evaluate = train.make_evaluate(problem, chunk=10)
    state, hist = train.fit(
        step,
        train.init_state(params, tx, jax.random.key(2)),
        ds,
        steps=20,
        batch_size=16,
        key=jax.random.key(3),
        evaluate=evaluate,
        num_evals=2,
    )
    assert hist.loss.shape == (20,) and np.all(np.diff(hist.wall) > 0)
    assert hist.eval_step.tolist() == [10, 20]
    assert hist.loss[-5:].mean() < hist.loss[:5].mean()
    logits = model.apply({"params": state.params}, data.normalize(ds.test_images))
    acc = float(np.mean(np.asarray(logits).argmax(-1) == ds.test_labels))
    assert hist.test_accuracy[-1] == pytest.approx(acc)
    loss = float(train.cross_entropy(logits, ds.test_labels))
    assert hist.test_loss[-1] == pytest.approx(loss, rel=1e-5)


def test_non_finite_direction_is_skipped_even_if_updates_are_finite():
    # Adam's moments would take the NaN although the last transform zeroes the update.
    problem, params = _problem()
    images, labels = _batch()
    zero = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(jnp.zeros_like, u), s),
    )
    tx = optax.chain(optax.scale_by_adam(), zero)

    def nan_gradient(problem, params, batch, key):
        value, grads, extra = train.backprop(problem, params, batch, key)
        return value, jax.tree.map(lambda g: g * jnp.nan, grads), extra

    state = train.init_state(params, tx, jax.random.key(0))
    before = jax.tree.map(np.asarray, state.opt_state)
    new_state, loss = jax.jit(train.make_step(problem, tx, nan_gradient))(state, images, labels)
    assert np.isfinite(loss) and int(new_state.skipped) == 1
    for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_init_state_copies_so_donation_spares_the_callers_params():
    problem, params = _problem()
    images, labels = _batch()
    tx = optax.sgd(0.1)
    step = train.jit_step(train.make_step(problem, tx))
    step(train.init_state(params, tx, jax.random.key(0)), images, labels)
    # A second run from the same initial parameters still works.
    state, _ = step(train.init_state(params, tx, jax.random.key(0)), images, labels)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_problem_rejects_a_loss_it_cannot_compute():
    problem = train.Problem(lambda p, x: x @ p, loss="mse")
    with pytest.raises(ValueError, match=r"Problem\.loss must be one of \['cross_entropy'\]"):
        problem.loss_fn(jnp.ones((2, 3)), jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32))


def _poison(tree, bad):
    leaves, treedef = jax.tree.flatten(tree)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(bad)
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_one_non_finite_entry_in_the_direction_skips_the_step(bad):
    # The check is one float reduction of x * 0 per leaf: one bad entry in one leaf must still
    # be caught, and huge finite values must not be mistaken for overflow.
    problem, params = _problem()
    images, labels = _batch()

    def gradient(problem, params, batch, key):
        value, grads, extra = train.backprop(problem, params, batch, key)
        grads = jax.tree.map(lambda g: g * 1e30, grads)  # finite, but squares would overflow
        return value, _poison(grads, bad), extra

    tx = optax.sgd(1e-30)
    state = train.init_state(params, tx, jax.random.key(0))
    new_state, _ = jax.jit(train.make_step(problem, tx, gradient))(state, images, labels)
    assert int(new_state.skipped) == 1
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_non_finite_update_entry_keeps_its_parameter(bad):
    # A transform that turns a finite direction into a non-finite update entry: that entry
    # keeps its value, every other entry takes its step, the step is not counted as skipped.
    problem, params = _problem()
    images, labels = _batch()
    last = len(jax.tree.leaves(params)) - 1
    post = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (_poison(u, bad), s),
    )
    tx = optax.chain(optax.sgd(0.1), post)
    state = train.init_state(params, tx, jax.random.key(0))
    new_state, _ = jax.jit(train.make_step(problem, tx))(state, images, labels)
    assert int(new_state.skipped) == 0
    grads = jax.grad(lambda p: problem.loss_fn(p, data.normalize(images), labels))(params)
    for i, (new, old, g) in enumerate(
        zip(
            jax.tree.leaves(new_state.params),
            jax.tree.leaves(params),
            jax.tree.leaves(grads),
            strict=True,
        )
    ):
        expected = np.array(old - 0.1 * g)
        if i == last:
            expected[(0,) * expected.ndim] = np.asarray(old)[(0,) * old.ndim]
        np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(new))


def test_huge_finite_direction_is_not_skipped():
    problem, params = _problem()
    images, labels = _batch()

    def gradient(problem, params, batch, key):
        value, grads, extra = train.backprop(problem, params, batch, key)
        return value, jax.tree.map(lambda g: jnp.full_like(g, 3e38), grads), extra

    tx = optax.sgd(1e-38)
    state = train.init_state(params, tx, jax.random.key(0))
    new_state, _ = jax.jit(train.make_step(problem, tx, gradient))(state, images, labels)
    assert int(new_state.skipped) == 0
