"""Matrix-free products and Hutchinson diagonals against brute-force autodiff on tiny problems
(tests/reference.py: the GGN, the losses written independently of the library)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt_suite.curvature import products
from tests import reference

ATOL = RTOL = 1e-5


def _mlp_params(key, sizes=(3, 4, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (a, b)) / np.sqrt(a),
            "b": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (b,)),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _mlp(params, x, act=jnp.tanh):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = act(x)
    return x


def _targets(loss, key, outputs):
    if loss == "cross_entropy":
        return jax.random.randint(key, outputs.shape[:-1], 0, outputs.shape[-1])
    if loss == "mse":
        return jax.random.normal(key, outputs.shape)
    return jax.random.uniform(key, outputs.shape)


def _callable_loss(out, y):
    # a per-sample loss whose output Hessian is dense and not of any named form
    return jnp.sum((out - y) ** 2) + 0.5 * jnp.sum(out) ** 2 + jnp.sum(jnp.cos(out))


# the named losses with "mean" (its 1/T differs per loss); "sum" for cross-entropy and a callable
@pytest.mark.parametrize(
    ("loss", "reduction"),
    [
        ("cross_entropy", "mean"),
        ("cross_entropy", "sum"),
        ("mse", "mean"),
        ("bce_with_logits", "mean"),
        ("callable", "sum"),
    ],
)
def test_ggn_vector_product_matches_jacobian_hessian_jacobian(loss, reduction):
    key = jax.random.key(0)
    params = _mlp_params(key)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    loss_arg = _callable_loss if loss == "callable" else loss
    y = _targets(loss, jax.random.key(2), _mlp(params, x))
    ggn = reference.ggn_matrix(_mlp, params, x, y, loss_arg, reduction)
    flat, unravel = ravel_pytree(params)
    vs = jax.random.normal(jax.random.key(10), (3, flat.size))

    @jax.jit
    def products_of(vs):
        matvec = products.ggn_matvec(_mlp, loss_arg, params, x, y, reduction)
        return jax.vmap(lambda v: ravel_pytree(matvec(unravel(v)))[0])(vs)

    np.testing.assert_allclose(products_of(vs), vs @ ggn, atol=ATOL, rtol=RTOL)


def test_ggn_over_a_sequence_axis_counts_every_position():
    # outputs (N, T, C): cross-entropy averages over N*T positions as in PyTorch
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    y = jax.random.randint(jax.random.key(2), (2, 4), 0, 3)
    ggn = reference.ggn_matrix(_mlp, params, x, y, "cross_entropy", "mean")
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(3), flat.shape)
    gv = jax.jit(products.ggn_vector_product, static_argnums=(0, 1))(
        _mlp, "cross_entropy", params, x, y, unravel(v)
    )
    np.testing.assert_allclose(ravel_pytree(gv)[0], ggn @ v, atol=ATOL, rtol=RTOL)


def test_ggn_equals_hessian_for_a_linear_model():
    # f = x W is linear in W, so the Hessian of the loss has no model-curvature term
    w = jax.random.normal(jax.random.key(0), (3, 4))
    x = jax.random.normal(jax.random.key(1), (6, 3))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 4)
    apply_fn = lambda p, inp: inp @ p
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p, y).mean()
    hess = jax.jit(jax.hessian(loss_fn))(w).reshape(12, 12)
    v = jax.random.normal(jax.random.key(3), (3, 4))
    gv = jax.jit(lambda v: products.ggn_vector_product(apply_fn, "cross_entropy", w, x, y, v))(v)
    np.testing.assert_allclose(gv.reshape(-1), hess @ v.reshape(-1), atol=ATOL, rtol=RTOL)


def test_reference_matches_closed_forms_on_a_linear_model():
    """tests/reference.py itself: for f = x W with mse (mean over N·D) the GGN and the Hessian
    are 2 / (N D) Σₙ xₙ xₙᵀ ⊗ I (W row-major), sample n's gradient is 2 / (N D) xₙ rₙᵀ with
    residual rₙ, the value the mean of the squared residuals."""
    w = jax.random.normal(jax.random.key(0), (3, 2))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.normal(jax.random.key(2), (4, 2))
    apply_fn = lambda p, inp: inp @ p
    xs = np.asarray(x, np.float64)
    closed = 2.0 / 8.0 * np.kron(xs.T @ xs, np.eye(2))
    ref = reference.quantities(apply_fn, w, x, y, "mse", full_ggn=True, hessian=True)
    np.testing.assert_allclose(ref["ggn"], closed, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(
        reference.hessian_matrix(apply_fn, w, x, y, "mse"), closed, atol=ATOL, rtol=RTOL
    )
    np.testing.assert_allclose(ref["diag_h"], np.diag(closed).reshape(3, 2), atol=ATOL, rtol=RTOL)
    residual = np.asarray(x @ w - y, np.float64)
    np.testing.assert_allclose(ref["value"], np.mean(residual**2), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(ref["grad"], 2.0 / 8.0 * xs.T @ residual, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(
        ref["grad_batch"], 2.0 / 8.0 * np.einsum("ni,nj->nij", xs, residual), atol=ATOL, rtol=RTOL
    )


def test_hessian_vector_product_matches_jax_hessian():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.randint(jax.random.key(2), (5,), 0, 3)
    loss_fn = lambda p, inp, lab: reference.batch_loss("cross_entropy", "mean")(_mlp(p, inp), lab)
    flat, unravel = ravel_pytree(params)
    hess = reference.hessian_matrix(_mlp, params, x, y, "cross_entropy", "mean")
    v = jax.random.normal(jax.random.key(3), flat.shape)
    hv = jax.jit(lambda v: products.hessian_vector_product(loss_fn, params, unravel(v), x, y))(v)
    np.testing.assert_allclose(ravel_pytree(hv)[0], hess @ v, atol=ATOL, rtol=RTOL)


def test_products_are_jittable_and_keep_dtype():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.randint(jax.random.key(2), (5,), 0, 3)
    fn = jax.jit(lambda p, v: products.ggn_vector_product(_mlp, "cross_entropy", p, x, y, v))
    out = fn(params, params)
    assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, params)
    eager = products.ggn_vector_product(_mlp, "cross_entropy", params, x, y, params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("loss", "out_shape", "reduction"),
    [
        ("cross_entropy", (3, 4), "mean"),
        ("cross_entropy", (3, 4), "sum"),
        ("cross_entropy", (2, 3, 4), "mean"),
        ("mse", (3, 2), "mean"),
        ("bce_with_logits", (3, 2), "mean"),
        ("callable", (3, 2), "mean"),
    ],
)
def test_loss_hessian_sqrt_squares_to_the_output_hessian(loss, out_shape, reduction):
    outputs = jax.random.normal(jax.random.key(0), out_shape)
    loss_arg = _callable_loss if loss == "callable" else loss
    targets = _targets(loss, jax.random.key(1), outputs)
    cols = products.loss_hessian_sqrt(loss_arg, outputs, targets, reduction)
    n = out_shape[0]
    s = cols.reshape(cols.shape[0], n, -1)  # (K, N, D): column k of every sample
    ref = reference.batch_loss(loss_arg, reduction)
    hess = jax.jit(jax.hessian(lambda o: ref(o.reshape(out_shape), targets)))(outputs.reshape(-1))
    blocks = np.asarray(hess).reshape(n, s.shape[-1], n, s.shape[-1])
    for i in range(n):  # the loss is a sum over samples: H is block diagonal, S_n S_n^T = H_n
        np.testing.assert_allclose(s[:, i].T @ s[:, i], blocks[i, :, i], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits", "callable"])
def test_monte_carlo_sqrt_is_unbiased(loss):
    outputs = jax.random.normal(jax.random.key(0), (2, 3))
    loss_arg = _callable_loss if loss == "callable" else loss
    targets = _targets(loss, jax.random.key(1), outputs)
    m = 20000
    cols = products.loss_hessian_sqrt(
        loss_arg, outputs, targets, "sum", key=jax.random.key(2), mc_samples=m
    )
    # sqrt(1/M) is folded into the columns: s^T s averages the M draws
    s = cols.reshape(m, -1)
    ref = reference.batch_loss(loss_arg, "sum")
    hess = jax.jit(jax.hessian(lambda o: ref(o.reshape(2, 3), targets)))(outputs.reshape(-1))
    # entries of s s^T are means of m products with variance <= E[s^4]; 5 sigma of the largest
    bound = 5 * np.sqrt(np.max(np.sum(np.asarray(s) ** 4, 0))) + 1e-6
    np.testing.assert_allclose(s.T @ s, hess, atol=bound)


def _dense_symmetric(key, n):
    a = jax.random.normal(key, (n, n))
    return a + a.T


def test_hutchinson_is_unbiased_within_its_variance():
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    flat, unravel = ravel_pytree(params)
    mat = _dense_symmetric(jax.random.key(0), flat.size)
    matvec = lambda v: unravel(mat @ ravel_pytree(v)[0])
    num = 4000
    estimate = jax.jit(lambda k: products.hutchinson_diagonal(matvec, params, k, num))(
        jax.random.key(1)
    )
    # one probe's entry i has variance sum_{j != i} M_ij^2 (Rademacher probes)
    m = np.asarray(mat)
    var = (m**2).sum(1) - np.diag(m) ** 2
    err = np.abs(ravel_pytree(estimate)[0] - np.diag(m))
    assert np.all(err <= 5 * np.sqrt(var / num)), (err, np.sqrt(var / num))


def test_hutchinson_is_exact_for_a_diagonal_operator():
    d = jnp.arange(1.0, 6.0)
    estimate = products.hutchinson_diagonal(lambda v: d * v, jnp.zeros(5), jax.random.key(0), 3)
    np.testing.assert_allclose(estimate, d, rtol=1e-6)


def test_hutchinson_chunks_give_the_same_estimate():
    mat = _dense_symmetric(jax.random.key(0), 4)
    whole = products.hutchinson_diagonal(lambda v: mat @ v, jnp.zeros(4), jax.random.key(1), 5)
    chunked = products.hutchinson_diagonal(
        lambda v: mat @ v, jnp.zeros(4), jax.random.key(1), 5, chunk_size=2
    )
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    # independently: the mean of v * (M v) over the same five probes
    keys = jax.random.split(jax.random.key(1), 5)
    probes = np.stack([np.asarray(products.rademacher_like(k, jnp.zeros(4))) for k in keys])
    np.testing.assert_allclose(whole, np.mean(probes * (probes @ np.asarray(mat)), 0), rtol=1e-5)


def test_hutchinson_of_the_ggn_and_the_hessian_approach_their_diagonals():
    params = _mlp_params(jax.random.key(0), sizes=(3, 3, 2))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.randint(jax.random.key(2), (4,), 0, 2)
    ggn = np.asarray(reference.ggn_matrix(_mlp, params, x, y, "cross_entropy", "mean"))
    loss_fn = lambda p: reference.batch_loss("cross_entropy", "mean")(_mlp(p, x), y)
    hess = reference.hessian_matrix(_mlp, params, x, y, "cross_entropy", "mean")
    num = 3000

    @jax.jit
    def estimates(key):
        ggn_mv = products.ggn_matvec(_mlp, "cross_entropy", params, x, y)
        hess_mv = lambda v: products.hessian_vector_product(loss_fn, params, v)
        return {
            "ggn": products.hutchinson_diagonal(ggn_mv, params, key, num),
            "hessian": products.hutchinson_diagonal(hess_mv, params, key, num),
        }

    results = estimates(jax.random.key(3))
    for name, mat in {"ggn": ggn, "hessian": hess}.items():
        est = results[name]
        sigma = np.sqrt(((mat**2).sum(1) - np.diag(mat) ** 2) / num)
        err = np.abs(ravel_pytree(est)[0] - np.diag(mat))
        assert np.all(err <= 5 * sigma + 1e-6), (name, err, sigma)


def test_hutchinson_estimator_feeds_sophia():
    # Sophia calls hessian_diagonal_fn.update(grads, state, params=..., **kwargs) inside a cond
    target = jnp.array([1.0, -2.0, 3.0])
    obj_fn = lambda p: jnp.sum(jnp.array([1.0, 2.0, 4.0]) * (p - target) ** 2)
    tx = optax.contrib.sophia(
        0.5,
        weight_decay=0.0,
        update_interval=1,
        clip_threshold=1.0,
        gamma=1.0,
        b1=0.0,
        b2=0.0,
        hessian_diagonal_fn=products.hutchinson_estimator(num_samples=1),
    )
    params = jnp.zeros(3)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(obj_fn)(params)
        matvec = lambda v: products.hessian_vector_product(obj_fn, params, v)
        updates, state = tx.update(grads, state, params, matvec=matvec)
        return optax.apply_updates(params, updates), state

    for _ in range(40):
        params, state = step(params, state)
    # exact for this diagonal Hessian; with b2 = 0 Sophia's nu is the last estimate, 2 * weights
    np.testing.assert_allclose(state[0].nu, [2.0, 4.0, 8.0], rtol=1e-2)
    np.testing.assert_allclose(params, target, atol=1e-3)


def test_engine_diagonal_estimator_gives_sophia_the_hessian_diagonal():
    # a tanh model: the GGN and Hessian diagonals differ; Sophia's nu (b2 = 0, refreshed every
    # step) must be the requested one, against jax.hessian / jacrev brute force
    params = _mlp_params(jax.random.key(0), sizes=(3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.randint(jax.random.key(2), (4,), 0, 2)
    _, unravel = ravel_pytree(params)
    loss_fn = lambda f: reference.batch_loss("cross_entropy", "mean")(_mlp(unravel(f), x), y)
    want = {
        "diag_h": np.diag(reference.hessian_matrix(_mlp, params, x, y, "cross_entropy", "mean")),
        "diag_ggn_exact": np.diag(
            reference.ggn_matrix(_mlp, params, x, y, "cross_entropy", "mean")
        ),
    }
    assert not np.allclose(want["diag_h"], want["diag_ggn_exact"], atol=1e-3)
    for quantity, diagonal in want.items():
        est = products.engine_diagonal_estimator(_mlp, "cross_entropy", quantity)
        tx = optax.contrib.sophia(
            0.1, b2=0.0, update_interval=1, weight_decay=0.0, hessian_diagonal_fn=est
        )
        grads = jax.grad(lambda p: loss_fn(ravel_pytree(p)[0]))(params)
        _, state = jax.jit(tx.update)(grads, tx.init(params), params, inputs=x, targets=y)
        np.testing.assert_allclose(ravel_pytree(state[0].nu)[0], diagonal, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="inputs= and targets="):
        est.update(params, est.init(params), params)
    with pytest.raises(ValueError, match="quantity must be one of"):
        products.engine_diagonal_estimator(_mlp, quantity="diag_ggn")


def test_hutchinson_estimator_with_obj_fn_matches_the_function():
    obj_fn = lambda p: jnp.sum(jnp.sin(p["x"])) + jnp.sum(p["y"] ** 2 * p["x"][0])
    params = {"x": jnp.array([0.3, -0.7]), "y": jnp.array([1.0, 2.0, 3.0])}
    key = jax.random.key(5)
    est = products.hutchinson_estimator(num_samples=7, key=key)
    out, state = est.update(params, est.init(params), params, obj_fn=obj_fn)
    _, probe_key = jax.random.split(key)
    direct = products.hutchinson_diagonal(
        lambda v: products.hessian_vector_product(obj_fn, params, v), params, probe_key, 7
    )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.array_equal(jax.random.key_data(state.key), jax.random.key_data(key))


def test_bad_input_raises_clear_errors():
    w = jnp.ones((3, 2))
    x = jnp.ones((4, 3))
    apply_fn = lambda p, inp: inp @ p
    labels = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid names: cross_entropy"):
        products.ggn_vector_product(apply_fn, "hinge", w, x, labels, w)
    with pytest.raises(ValueError, match="reduction must be one of"):
        products.ggn_vector_product(apply_fn, "mse", w, x, jnp.ones((4, 2)), w, "avg")
    with pytest.raises(ValueError, match=r"integer class labels of shape outputs.shape\[:-1\]"):
        products.ggn_vector_product(apply_fn, "cross_entropy", w, x, jnp.zeros(3, int), w)
    with pytest.raises(ValueError, match="integer class labels"):
        products.ggn_vector_product(apply_fn, "cross_entropy", w, x, jnp.zeros(4), w)
    with pytest.raises(ValueError, match="targets of the outputs' shape"):
        products.ggn_vector_product(apply_fn, "mse", w, x, jnp.ones((4, 3)), w)
    with pytest.raises(ValueError, match=r"scalar"):
        products.ggn_vector_product(apply_fn, lambda o, t: o - t, w, x, jnp.ones((4, 2)), w)
    with pytest.raises(ValueError, match=r"vector\['b'\] has shape \(3,\)"):
        products.hessian_vector_product(
            lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"]),
            {"a": jnp.ones(2), "b": jnp.ones(2)},
            {"a": jnp.ones(2), "b": jnp.ones(3)},
        )
    with pytest.raises(ValueError, match="structure of params"):
        products.hessian_vector_product(jnp.sum, jnp.ones(2), [jnp.ones(2)])
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        products.hutchinson_diagonal(lambda v: v, w, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="key is required"):
        products.loss_hessian_sqrt("mse", jnp.ones((2, 2)), jnp.ones((2, 2)), mc_samples=3)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        products.loss_hessian_sqrt(
            "mse", jnp.ones((2, 2)), jnp.ones((2, 2)), key=jax.random.key(0), mc_samples=0
        )
    est = products.hutchinson_estimator()
    with pytest.raises(ValueError, match="matvec="):
        est.update(w, est.init(w), w)
