"""The training loop shared by ``compare``, the benchmarks and the notebooks.

A step is one jitted function ``step(state, images, labels) -> (state, loss)`` built from

* a :class:`Problem` (the model's ``apply_fn`` and the loss),
* an optax transformation ``tx``, and
* a *gradient function*: how the direction handed to ``tx`` and the extra keyword arguments of
  ``tx.update`` are computed. :func:`backprop` (``jax.value_and_grad``, passing ``value=``) is
  the default; :func:`curvature_gradient` adds a curvature quantity of the engine
  (``curvature=`` or ``factors=``) and :func:`value_fn_gradient` the loss as a function
  (``value_fn=``), for the methods that need them.

The step never syncs with the host. A non-finite loss or direction leaves the parameters and
the optimizer state untouched and increments ``TrainState.skipped``; a parameter entry whose
update would make it non-finite (a transformation's own overflow or 0/0 from a finite
direction) keeps its value, so no NaN or inf ever reaches the parameters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import curvature
from jaxopt_suite._tree import all_finite
from jaxopt_suite._typing import PyTree
from jaxopt_suite.harness import data as data_lib


def small_budget() -> bool:
    """True when ``JAXOPT_SUITE_SMALL`` is set: notebooks and examples shrink their runs
    (the test suite executes every notebook this way)."""
    return os.environ.get("JAXOPT_SUITE_SMALL", "") not in ("", "0")


Batch = tuple[jax.Array, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (PyTorch's ``CrossEntropyLoss``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Losses a Problem can name: mean over the batch of a per-sample loss of (logits, labels).
PROBLEM_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": cross_entropy,
}


class Problem(NamedTuple):
    """A supervised classification problem: ``apply_fn(params, inputs) -> logits`` and its loss.

    ``loss`` names the loss both for :meth:`loss_fn` and for methods that need its structure
    (the curvature engine), so the two always agree. Classification with integer labels
    supports ``"cross_entropy"`` (the mean softmax cross-entropy, :func:`cross_entropy`).
    """

    apply_fn: Callable[[PyTree, jax.Array], jax.Array]
    loss: str = "cross_entropy"

    def loss_fn(self, params: PyTree, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        """The mean loss of the batch."""
        if self.loss not in PROBLEM_LOSSES:
            raise ValueError(
                f"Problem.loss must be one of {sorted(PROBLEM_LOSSES)}; got {self.loss!r}"
            )
        return PROBLEM_LOSSES[self.loss](self.apply_fn(params, inputs), labels)


GradientFn = Callable[[Problem, PyTree, Batch, jax.Array], tuple[jax.Array, PyTree, dict]]


def backprop(problem: Problem, params: PyTree, batch: Batch, key: jax.Array):
    """The plain gradient by reverse mode; passes the loss as ``value=`` to the transformation."""
    del key
    value, grads = jax.value_and_grad(problem.loss_fn)(params, *batch)
    return value, grads, {"value": value}


# The keyword of ``tx.update`` that receives each quantity of the curvature engine: diagonals
# shaped like the parameters go to ``precondition.scale_by_diagonal_curvature`` as
# ``curvature=``, Kronecker factors to ``kronecker.scale_by_kronecker`` as ``factors=``.
CURVATURE_KEYWORDS: dict[str, str] = {
    "diag_ggn_mc": "curvature",
    "diag_ggn_exact": "curvature",
    "sum_grad_squared": "curvature",
    "variance": "curvature",
    "kfac": "factors",
    "kflr": "factors",
    "kfra": "factors",
}


def curvature_gradient(
    quantity: str = "diag_ggn_mc", *, mc_samples: int = 1, **options: Any
) -> GradientFn:
    """A :data:`GradientFn` that feeds a curvature-preconditioned transformation.

    Each step calls ``curvature.value_and_grad(problem.apply_fn, loss=problem.loss,
    quantities=(quantity,))`` once (loss, gradient and the quantity in one pass) and hands the
    quantity to ``tx.update``: a diagonal as ``curvature=``
    (:func:`jaxopt_suite.precondition.diag_ggn_sgd`), Kronecker factors as ``factors=``
    (:func:`jaxopt_suite.kronecker.kfac_sgd`); the loss goes as ``value=``. Factors cover the
    Dense and Conv layers the engine recognises in any flax model; other 1-D leaves get their
    exact GGN block, other leaves ``None`` (passed through unpreconditioned).

    Args:
      quantity: a diagonal shaped like the parameters (``"diag_ggn_mc"``, ``"diag_ggn_exact"``,
        ``"sum_grad_squared"``, ``"variance"``) or Kronecker factors (``"kfac"``: Monte Carlo
        G; ``"kflr"``: exact G; ``"kfra"``: G backpropagated batch-averaged, Dense chains only).
      mc_samples: Monte Carlo samples of the ``*_mc`` quantities and of ``"kfac"``.
      **options: further keyword arguments of :func:`jaxopt_suite.curvature.value_and_grad`
        (``chunk_size``, ``structured``).

    Returns:
      ``gradient(problem, params, batch, key) -> (value, grads, {"value", "curvature"})``
      (``"factors"`` instead of ``"curvature"`` for Kronecker factors).

    Example: one step of Kronecker-factored preconditioning with exact factors (KFLR)::

        >>> import jax
        >>> from jaxopt_suite import kronecker
        >>> from jaxopt_suite.harness import data, train, zoo
        >>> model = zoo.MLP(hidden=(16,))
        >>> problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
        >>> tx = kronecker.kfac_sgd(0.03, damping=1e-2)
        >>> gradient = train.curvature_gradient("kflr")
        >>> step = train.jit_step(train.make_step(problem, tx, gradient))
        >>> params = zoo.init_params(model, jax.random.key(0))
        >>> state = train.init_state(params, tx, jax.random.key(1))
        >>> ds = data.synthetic(jax.random.key(2))
        >>> state, loss = step(state, ds.train_images[:32], ds.train_labels[:32])
        >>> int(state.step), int(state.skipped)
        (1, 0)
    """
    if quantity not in CURVATURE_KEYWORDS:
        raise ValueError(
            f"quantity must be one of {sorted(CURVATURE_KEYWORDS)} (a diagonal shaped like the "
            f"parameters, or Kronecker factors); got {quantity!r}"
        )
    keyword = CURVATURE_KEYWORDS[quantity]

    def gradient(problem: Problem, params: PyTree, batch: Batch, key: jax.Array):
        fn = curvature.value_and_grad(
            problem.apply_fn,
            loss=problem.loss,
            quantities=(quantity,),
            mc_samples=mc_samples,
            **options,
        )
        value, grads, extras = fn(params, *batch, key=key)
        return value, grads, {"value": value, keyword: extras[quantity]}

    return gradient


def value_fn_gradient(problem: Problem, params: PyTree, batch: Batch, key: jax.Array):
    """A :data:`GradientFn` for transformations that differentiate the loss themselves
    (:func:`jaxopt_suite.forward_gradient`): passes zeros as the direction and ``value_fn``, the
    loss on this batch, as an extra argument. The loss reported is computed by the same forward
    pass (XLA merges the two identical primal computations)."""
    del key
    value_fn = lambda p: problem.loss_fn(p, *batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return value_fn(params), zeros, {"value_fn": value_fn}


class TrainState(NamedTuple):
    """Everything a step carries: parameters, optimizer state, PRNG key, counters."""

    params: PyTree
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    skipped: jax.Array  # steps whose loss, direction or extra arrays were not finite


def init_state(params: PyTree, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """The state before the first step. The parameters are copied, so the caller's arrays
    survive the donation in :func:`jit_step` and can start another run."""
    params = jax.tree.map(jnp.array, params)
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        key=key,
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def make_step(
    problem: Problem,
    tx: optax.GradientTransformation,
    gradient: GradientFn = backprop,
    preprocess: Callable[[jax.Array], jax.Array] = data_lib.normalize,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """Builds the (un-jitted) training step; wrap it in ``jax.jit`` (see :func:`jit_step`).

    Args:
      problem: model and loss.
      tx: any optax transformation; plain ones are given extra-argument support, so the extra
        keyword arguments from ``gradient`` are ignored by transforms that don't use them.
      gradient: computes ``(loss value, direction, extra kwargs for tx.update)``.
      preprocess: maps the raw batch inputs (uint8 images) to model inputs, inside the step.

    Returns:
      ``step(state, images, labels) -> (new_state, loss)``.

    Example::

        >>> import jax, optax
        >>> from jaxopt_suite.harness import data, train, zoo
        >>> model = zoo.MLP(hidden=(16,))
        >>> problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
        >>> tx = optax.sgd(0.1)
        >>> step = train.jit_step(train.make_step(problem, tx, train.backprop))
        >>> params = zoo.init_params(model, jax.random.key(0))
        >>> state = train.init_state(params, tx, jax.random.key(1))
        >>> ds = data.synthetic(jax.random.key(2))
        >>> state, loss = step(state, ds.train_images[:32], ds.train_labels[:32])
        >>> int(state.step), int(state.skipped), bool(loss > 0)
        (1, 0, True)
    """
    tx = optax.with_extra_args_support(tx)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        key, subkey = jax.random.split(state.key)
        batch = (preprocess(images), labels)
        value, direction, extra = gradient(problem, state.params, batch, subkey)
        updates, opt_state = tx.update(direction, state.opt_state, state.params, **extra)
        # A non-finite loss, direction or extra array (curvature, factors) skips the whole
        # step (parameters and optimizer state; the direction too, since a transform that
        # zeroes a non-finite step would otherwise let the NaN into the state of the
        # transforms before it in a chain; the extras too, since a NaN curvature would reach
        # the state of a momentum after the preconditioner and stall every later step). The
        # updates are
        # not reduced over: that made XLA keep a parameter-sized temporary for any update
        # that is not trivially recomputed (AliG's, the grouped prox's). Instead each entry
        # whose new value p + u is not finite (a transform's own overflow or 0/0) keeps p.
        ok = jnp.isfinite(value) & all_finite(direction)
        extra_arrays = [x for x in jax.tree.leaves(extra) if isinstance(x, jax.Array)]
        if extra_arrays:
            ok = ok & all_finite(extra_arrays)
        new_params = optax.apply_updates(state.params, updates)
        new_params = jax.tree.map(
            lambda new, old: jnp.where(ok & jnp.isfinite(new), new, old), new_params, state.params
        )
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            params=new_params,
            opt_state=keep(opt_state, state.opt_state),
            key=key,
            step=state.step + 1,
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        return new_state, value

    return step


def jit_step(step: Callable) -> Callable:
    """``jax.jit`` with the state donated, so parameters are updated in place."""
    return jax.jit(step, donate_argnums=0)


def make_evaluate(problem: Problem, preprocess=data_lib.normalize, chunk: int = 1000):
    """Returns ``evaluate(params, images, labels) -> (accuracy, mean loss)`` over a whole set."""

    @jax.jit
    def sums(params, images, labels):
        logits = problem.apply_fn(params, preprocess(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        correct = (logits.argmax(-1) == labels).sum()
        return correct, loss

    def evaluate(params, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        correct, loss = 0, 0.0
        for start in range(0, len(images), chunk):
            c, ell = sums(params, images[start : start + chunk], labels[start : start + chunk])
            correct, loss = correct + c, loss + ell
        n = len(images)
        return float(correct) / n, float(loss) / n

    return evaluate


class History(NamedTuple):
    """What :func:`fit` recorded, as host arrays."""

    loss: np.ndarray  # (steps,) training mini-batch loss
    wall: np.ndarray  # (steps,) seconds since the first step started (compilation excluded)
    step_time: np.ndarray  # (steps,) seconds per step
    eval_step: np.ndarray  # (E,) steps at which the test set was evaluated
    eval_wall: np.ndarray  # (E,) wall-clock seconds of those evaluations
    test_accuracy: np.ndarray  # (E,)
    test_loss: np.ndarray  # (E,)
    skipped: int  # steps skipped for a non-finite loss or direction


def epochs(key: jax.Array, images, labels, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless shuffled mini-batches, a new permutation each epoch (partial batches dropped)."""
    while True:
        key, subkey = jax.random.split(key)
        yield from data_lib.batches(subkey, images, labels, batch_size=batch_size)


def fit(
    step: Callable,
    state: TrainState,
    dataset: data_lib.Dataset,
    *,
    steps: int,
    batch_size: int,
    key: jax.Array,
    evaluate: Callable | None = None,
    num_evals: int = 5,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[TrainState, History]:
    """Runs ``steps`` jitted steps, timing each one, and evaluates ``num_evals`` times.

    ``step`` must be jitted (:func:`jit_step`); it is compiled before the clock starts. Each step
    is synchronised so its time is exact; evaluation time is excluded from the wall clock.

    Example: 40 steps of SGD on the synthetic set, evaluated after steps 20 and 40::

        >>> import jax, optax
        >>> from jaxopt_suite.harness import data, train, zoo
        >>> model = zoo.MLP(hidden=(16,))
        >>> problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
        >>> tx = optax.sgd(0.1)
        >>> step = train.jit_step(train.make_step(problem, tx))
        >>> state = train.init_state(zoo.init_params(model, jax.random.key(0)), tx,
        ...                          jax.random.key(1))
        >>> state, history = train.fit(
        ...     step, state, data.synthetic(jax.random.key(2)), steps=40, batch_size=32,
        ...     key=jax.random.key(3), evaluate=train.make_evaluate(problem), num_evals=2)
        >>> history.loss.shape, history.eval_step.tolist(), history.skipped
        ((40,), [20, 40], 0)
        >>> bool(history.loss[-5:].mean() < history.loss[:5].mean())
        True
    """
    batches = epochs(key, dataset.train_images, dataset.train_labels, batch_size)
    images, labels = next(batches)
    compiled = step.lower(state, images, labels).compile()
    eval_at = set(np.linspace(0, steps, num_evals + 1).astype(int)[1:]) if evaluate else set()
    losses, walls, times = [], [], []
    ev_step, ev_wall, ev_acc, ev_loss = [], [], [], []
    wall = 0.0
    for i in range(1, steps + 1):
        start = time.perf_counter()
        state, value = compiled(state, images, labels)
        value.block_until_ready()
        elapsed = time.perf_counter() - start
        wall += elapsed
        losses.append(value)
        walls.append(wall)
        times.append(elapsed)
        if progress is not None:
            progress(i, value)
        if i in eval_at:
            acc, test_loss = evaluate(state.params, dataset.test_images, dataset.test_labels)
            ev_step.append(i), ev_wall.append(wall), ev_acc.append(acc), ev_loss.append(test_loss)
        if i < steps:
            images, labels = next(batches)
    history = History(
        loss=np.asarray(jax.device_get(losses), np.float64),
        wall=np.asarray(walls),
        step_time=np.asarray(times),
        eval_step=np.asarray(ev_step, np.int64),
        eval_wall=np.asarray(ev_wall),
        test_accuracy=np.asarray(ev_acc),
        test_loss=np.asarray(ev_loss),
        skipped=int(state.skipped),
    )
    return state, history


# The per-sample form of each loss a Problem can name (its mean is PROBLEM_LOSSES' loss), for
# the estimators that need every sample's loss separately.
PER_SAMPLE_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": optax.softmax_cross_entropy_with_integer_labels,
}


def _per_sample_loss(problem: Problem) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if problem.loss not in PER_SAMPLE_LOSSES:
        raise ValueError(
            f"Problem.loss must be one of {sorted(PER_SAMPLE_LOSSES)}; got {problem.loss!r}"
        )
    return PER_SAMPLE_LOSSES[problem.loss]


def activity_gradient(num_directions: int = 1, distribution: str = "normal") -> GradientFn:
    """A :data:`GradientFn` whose direction is the activity-perturbed forward gradient of the
    loss (:func:`jaxopt_suite.fwdgrad.value_and_activity_grad`): forward mode only, for any
    optax transformation; passes the loss as ``value=``.

    Example::

        >>> import jax, optax
        >>> from jaxopt_suite.harness import data, train, zoo
        >>> model = zoo.MLP(hidden=(16,))
        >>> problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
        >>> tx = optax.sgd(0.1)
        >>> step = train.jit_step(train.make_step(problem, tx, train.activity_gradient()))
        >>> state = train.init_state(zoo.init_params(model, jax.random.key(0)), tx,
        ...                          jax.random.key(1))
        >>> ds = data.synthetic(jax.random.key(2))
        >>> state, loss = step(state, ds.train_images[:32], ds.train_labels[:32])
        >>> int(state.step), bool(loss > 0)
        (1, True)
    """
    from jaxopt_suite import fwdgrad

    options = {"num_directions": num_directions, "distribution": distribution}
    fwdgrad.value_and_activity_grad(lambda p, x: x, lambda o, y: o, **options)  # checks options

    def gradient(problem: Problem, params: PyTree, batch: Batch, key: jax.Array):
        estimate = fwdgrad.value_and_activity_grad(
            problem.apply_fn, _per_sample_loss(problem), **options
        )
        value, grads = estimate(key, params, *batch)
        return value, grads, {"value": value}

    return gradient


def local_gradient(
    blocks: Any, num_directions: int = 1, distribution: str = "normal"
) -> GradientFn:
    """A :data:`GradientFn` that trains each of ``blocks`` with the activity forward gradient of
    its own local loss (:func:`jaxopt_suite.fwdgrad.value_and_local_grad`); the problem's
    ``apply_fn`` is ``fwdgrad.chain_blocks(blocks)`` and its parameters one entry per block.
    The loss reported (and passed as ``value=``) is the last block's: the model's loss."""
    from jaxopt_suite import fwdgrad

    options = {"num_directions": num_directions, "distribution": distribution}
    fwdgrad.value_and_local_grad(blocks, lambda o, y: o, **options)  # checks the arguments

    def gradient(problem: Problem, params: PyTree, batch: Batch, key: jax.Array):
        estimate = fwdgrad.value_and_local_grad(blocks, _per_sample_loss(problem), **options)
        losses, grads = estimate(key, params, *batch)
        return losses[-1], grads, {"value": losses[-1]}

    return gradient
