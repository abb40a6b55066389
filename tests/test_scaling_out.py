"""Every method under SPMD sharding equals its single-device self; bfloat16 parameters.

The multi-device bodies run on 8 simulated CPU devices in a subprocess (one per group of
methods, to pay JAX's start-up once). Inside a body, ``jax.jit`` without shardings runs on one
device and is the reference; the same function jitted with the batch split over the mesh (and
the training state replicated, or FSDP-sharded) must give the same numbers up to float32
reduction order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_suite import curvature, fwdgrad, kronecker, methods, proxprop, train, zoo
from tests.multidevice import run_on_devices

# A tiny MLP problem shared by the bodies: 16 uint8 4x4 images, 4 classes, hidden (16, 8).
_PROBLEM = """
import functools
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxopt_suite import methods, sharding, train, zoo

mesh = sharding.make_mesh()
rows = NamedSharding(mesh, P("data"))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 4, 4), dtype=np.uint8)
labels = rng.integers(0, 4, (16,), dtype=np.int32)
x = np.asarray(train.data_lib.normalize(images)).reshape(16, -1)

def tiny_model(layers):
    fields = {k: v for k, v in layers.items() if k in ("dense", "last")}
    return zoo.MLP(hidden=(16, 8), num_classes=4, **fields)

def close(a, b, rtol=2e-5, atol=2e-6, what=""):
    data = lambda t: jax.tree.map(
        lambda l: jax.random.key_data(l)
        if jax.dtypes.issubdtype(l.dtype, jax.dtypes.prng_key) else l, t)
    for u, v in zip(jax.tree.leaves(data(a)), jax.tree.leaves(data(b)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol,
                                   err_msg=what)

def copy(tree):
    return jax.tree.map(jnp.array, tree)
"""

# Training-step check: two steps of a method's compare Setup, single device vs data parallel
# (replicated state) and, with layouts=(False, True), FSDP (state split along its largest
# divisible axis). Each layout is one more compilation on 8 devices (seconds each), so FSDP is
# checked for the methods whose maths reduce over parameter axes (norms, Gram/factor inverses).
_STEPS = """
def check_steps(name, setup, rtol=2e-5, atol=2e-6, layouts=(False,)):
    model = tiny_model(setup.layers)
    params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    step = train.make_step(problem, setup.tx, setup.gradient)
    state0 = train.init_state(params, setup.tx, jax.random.key(3))
    single = jax.jit(step)
    ref, ref_losses = state0, []
    for _ in range(2):
        ref, loss = single(ref, images, labels)
        ref_losses.append(loss)
    assert int(ref.skipped) == 0, name
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref.params, params)
    assert max(jax.tree.leaves(moved)) > 0, f"{name}: the reference step did not move"
    for shard_params in layouts:
        sharded, state = sharding.data_parallel(step, copy(state0), mesh,
                                                shard_params=shard_params)
        losses = []
        for _ in range(2):
            state, loss = sharded(state, images, labels)
            losses.append(loss)
        what = f"{name} shard_params={shard_params}"
        close(losses, ref_losses, rtol, atol, what)
        close(state.params, ref.params, rtol, atol, what)
        close(state.opt_state, ref.opt_state, rtol, atol, what)
        if shard_params:
            kernel = state.params["Dense_0"]["kernel"]
            assert not kernel.sharding.is_fully_replicated, what
    print(name, "ok")
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_compare_methods_train_the_same_on_8_devices():
    # Every non-baseline method of `compare` (AliG, proximal / group sparsity, diag GGN-MC,
    # forward gradient, ProxProp cg and exact), and KFLR through kronecker.kfac_sgd.
    out = run_on_devices(
        _PROBLEM
        + _STEPS
        + """
from jaxopt_suite import kronecker

registry = methods.registry()
# proxprop-adam differs from proxprop only in the optimizer and fwdgrad-normal from fwdgrad
# only in the directions (checked at function level below).
names = [n for n in registry if n not in ("sgd", "sgd-momentum", "adam", "proxprop-adam",
                                          "fwdgrad-normal")]
fsdp = {"alig", "sgd+linf1", "sgd+l21", "proxprop-exact"}
for name in names:
    setup = registry[name].build(methods.RunConfig(steps=100, batch_size=16, seed=0))
    check_steps(name, setup, layouts=(False, True) if name in fsdp else (False,))

def kflr_gradient(problem, params, batch, key):
    value, grads, factors = kronecker.mlp_value_grad_and_factors(params, *batch)
    return value, grads, {"value": value, "factors": factors}

check_steps("kflr", methods.Setup(kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1),
                                  gradient=kflr_gradient), rtol=1e-4, atol=1e-5,
            layouts=(False, True))
print("names", names)
"""
    )
    for name in ("alig", "sgd+l21", "diag-ggn-mc", "fwdgrad", "proxprop-exact", "kflr"):
        assert f"{name} ok" in out, out


@pytest.mark.slow
@pytest.mark.multidevice
def test_function_level_apis_are_global_batch_on_8_devices():
    # curvature quantities (batch quantities stay split along N), Kronecker factors, forward
    # gradient directions, ProxProp's Gram solve: jitted with the batch split over 8 devices.
    out = run_on_devices(
        _PROBLEM
        + """
from jaxopt_suite import curvature, fwdgrad, kronecker, proxprop

model = tiny_model({})
params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
apply = lambda p, x: model.apply({"params": p}, x)
xs, ys = jax.device_put(x, rows), jax.device_put(labels, rows)

# curvature: every quantity, mean reduction, MC ones with the same key.
names = tuple(curvature.QUANTITIES)
fn = jax.jit(curvature.value_and_grad(apply, loss="cross_entropy", quantities=names,
                                       mc_samples=2))
key = jax.random.key(7)
ref = fn(params, x, labels, key=key)
got = fn(params, xs, ys, key=key)
close(got, ref, what="curvature")
per_sample = [n for n in names if n in ("grad_batch", "batch_l2") or n.endswith("_batch")]
for n in per_sample:
    for leaf in jax.tree.leaves(got[2][n]):
        assert leaf.shape[0] == 16
        assert leaf.sharding.spec and leaf.sharding.spec[0] == "data", (n, leaf.sharding)
for n in set(names) - set(per_sample):
    for leaf in jax.tree.leaves(got[2][n]):
        assert leaf.sharding.is_fully_replicated, (n, leaf.sharding)
print("curvature ok")

# Kronecker factors (KFLR exact and KFAC MC): sums over the global batch.
for mc in (None, 2):
    f = jax.jit(functools.partial(kronecker.mlp_value_grad_and_factors, mc_samples=mc))
    close(f(params, xs, ys, key=key), f(params, x, labels, key=key), 2e-5, 2e-6, f"kron {mc}")
print("kronecker ok")

# forward gradient: directions from a replicated key, the same on every device.
loss = lambda p, x, y: train.cross_entropy(apply(p, x), y)
for dist, structure in (("normal", "dense"), ("rademacher", "rank_one")):
    g = jax.jit(fwdgrad.forward_grad(loss, num_directions=3, distribution=dist,
                                     structure=structure))
    close(g(key, params, xs, ys), g(key, params, x, labels), what=f"fwdgrad {dist}")
print("fwdgrad ok")

# ProxProp: the direction solves with the Gram matrix of the global batch.
w = jax.random.normal(jax.random.key(1), (16, 5))
b = jnp.zeros(5)
z = jax.random.normal(jax.random.key(2), (16, 5))
zs = jax.device_put(z, rows)
for mode in ("prox_exact", "prox_cg3", "prox_cg1"):
    def direction(x, z, w=w, b=b, mode=mode):
        out = lambda w, b: jnp.vdot(proxprop.proxprop_dense(x, w, b, tau_prox=0.5,
                                                            optimization_mode=mode), z)
        return jax.grad(out, argnums=(0, 1))(w, b)
    d = jax.jit(direction)
    close(d(xs, zs), d(x, z), 1e-4, 1e-5, mode)
print("proxprop ok")
"""
    )
    for name in ("curvature", "kronecker", "fwdgrad", "proxprop"):
        assert f"{name} ok" in out, out


@pytest.mark.multidevice
def test_process_local_batches_assemble_the_global_batch():
    # Multi-host input path with one process: each host passes its rows, the global array
    # is split over the mesh, and a data-parallel step on it equals the plain step.
    out = run_on_devices(
        _PROBLEM
        + """
assert jax.process_count() == 1
gx, gy = sharding.global_batch(mesh, images, labels)
assert gx.shape == images.shape and gy.shape == labels.shape
assert gx.sharding.spec[0] == "data" and len(gx.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(gx), images)
np.testing.assert_array_equal(np.asarray(gy), labels)
tx = optax.sgd(0.1)
model = tiny_model({})
params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
step = train.make_step(train.Problem(lambda p, x: model.apply({"params": p}, x)), tx)
state0 = train.init_state(params, tx, jax.random.key(1))
ref, _ = jax.jit(step)(state0, images, labels)
sharded, state = sharding.data_parallel(step, copy(state0), mesh)
state, _ = sharded(state, gx, gy)
close(state.params, ref.params)
try:
    sharding.global_batch(mesh, images[:12])
except ValueError as err:
    assert "divisible" in str(err), err
else:
    raise AssertionError("12 rows on 8 devices must be refused")
print("ok")
"""
    )
    assert "ok" in out


# ---------------------------------------------------------------------------------------------
# bfloat16 parameters (single device)

_SHAPE = (4, 4, 1)
_BF16_IMAGES = np.random.default_rng(0).integers(0, 256, (8, 4, 4), dtype=np.uint8)
_BF16_LABELS = np.random.default_rng(1).integers(0, 4, (8,), dtype=np.int32)

# Methods whose step does not keep bfloat16 parameters (documented gaps).
_BF16_GAPS: dict[str, str] = {
    "kflr": "kronecker._spd_inverse calls a Cholesky (LAPACK potrf) on the factors, which has "
    "no bfloat16 kernel on CPU (NotImplementedError); fix: invert in float32, cast back",
}


@pytest.fixture(scope="module")
def registry():
    return methods.registry()


def _kflr_setup() -> methods.Setup:
    def gradient(problem, params, batch, key):
        value, grads, factors = kronecker.mlp_value_grad_and_factors(params, *batch)
        return value, grads, {"value": value, "factors": factors}

    return methods.Setup(kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1), gradient=gradient)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=_BF16_GAPS[n]))
        if n in _BF16_GAPS
        else n
        for n in [
            "sgd",
            "alig",
            "sgd+linf1",
            "sgd+l21",
            "diag-ggn-mc",
            "fwdgrad",
            "proxprop",
            "proxprop-exact",
            "kflr",
        ]
    ],
)
def test_bfloat16_parameters_keep_their_dtype(name, registry):
    setup = (
        _kflr_setup()
        if name == "kflr"
        else registry[name].build(methods.RunConfig(steps=100, batch_size=8, seed=0))
    )
    fields = {k: v for k, v in setup.layers.items() if k in ("dense", "last")}
    model = zoo.MLP(hidden=(8,), num_classes=4, **fields)
    params = zoo.init_params(model, jax.random.key(0), image_shape=_SHAPE)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    step = jax.jit(train.make_step(problem, setup.tx, setup.gradient))
    state = train.init_state(params, setup.tx, jax.random.key(1))
    state, loss = step(state, _BF16_IMAGES, _BF16_LABELS)
    state, loss = step(state, _BF16_IMAGES, _BF16_LABELS)
    dtypes = {str(p.dtype) for p in jax.tree.leaves(state.params)}
    assert dtypes == {"bfloat16"}, dtypes
    assert int(state.skipped) == 0
    moved = [
        float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True)
    ]
    assert max(moved) > 0
    assert np.isfinite(float(loss))


# bfloat16 parameters and activations at the function level: results come back in bfloat16 and
# agree with the float32 computation to bfloat16 precision.

_GGN_BF16 = (
    "curvature.engine.value_and_grad: the GGN columns (loss Hessian square root, scaled by "
    "sqrt(c)) are float32 for bfloat16 outputs and the layer VJP refuses a float32 cotangent "
    "for a bfloat16 output; fix: cast the columns to outputs.dtype before backpropagating"
)


def _bf16_problem():
    model = zoo.MLP(hidden=(8,), num_classes=4)
    params = zoo.init_params(model, jax.random.key(0), image_shape=_SHAPE)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 16)), jnp.float32)
    return (lambda p, x: model.apply({"params": p}, x)), params, x, jnp.asarray(_BF16_LABELS)


def _bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)


def _agree_in_bf16(low, high):
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(high), strict=True):
        assert a.dtype == jnp.bfloat16, a.dtype
        scale = float(jnp.abs(b).max()) + 1e-6
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b), atol=0.05 * scale, rtol=0.05
        )


def _bf16_curvature(quantities):
    apply, params, x, y = _bf16_problem()
    fn = jax.jit(curvature.value_and_grad(apply, loss="cross_entropy", quantities=quantities))
    key = jax.random.key(3)
    value, grads, extras = fn(_bf16(params), _bf16(x), y, key=key)
    ref_value, ref_grads, ref_extras = fn(params, x, y, key=key)
    _agree_in_bf16(value, ref_value)
    _agree_in_bf16(grads, ref_grads)
    for q in quantities:
        assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(extras[q]))
        if "mc" in q:  # MC draws differ with the dtype: dtype and finiteness only
            assert {a.dtype for a in jax.tree.leaves(extras[q])} == {jnp.dtype(jnp.bfloat16)}
        else:
            _agree_in_bf16(extras[q], ref_extras[q])


def test_bfloat16_curvature_gradient_quantities():
    _bf16_curvature(tuple(q for q in curvature.QUANTITIES if "ggn" not in q))


@pytest.mark.xfail(strict=True, reason=_GGN_BF16)
def test_bfloat16_curvature_ggn_quantities():
    _bf16_curvature(tuple(q for q in curvature.QUANTITIES if "ggn" in q))


def test_bfloat16_kronecker_factors_forward_gradient_and_proxprop():
    apply, params, x, y = _bf16_problem()
    f = jax.jit(kronecker.mlp_value_grad_and_factors)
    _agree_in_bf16(f(_bf16(params), _bf16(x), y), f(params, x, y))

    loss = lambda p, x: train.cross_entropy(apply(p, x), y)
    g = jax.jit(fwdgrad.forward_grad(loss, distribution="rademacher", structure="rank_one"))
    # Rademacher directions are exact in bfloat16, so the estimate is the f32 one, rounded.
    _agree_in_bf16(g(jax.random.key(0), _bf16(params), _bf16(x)), g(jax.random.key(0), params, x))

    w, b = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    z = jax.random.normal(jax.random.key(4), (8, 8))
    for mode in ("prox_exact", "prox_cg3"):

        def direction(x, w, b, mode=mode):
            out = lambda w, b: jnp.vdot(
                proxprop.proxprop_dense(x, w, b, tau_prox=0.5, optimization_mode=mode).astype(
                    jnp.float32
                ),
                z,
            )
            return jax.grad(out, argnums=(0, 1))(w, b)

        d = jax.jit(direction)
        _agree_in_bf16(d(_bf16(x), _bf16(w), _bf16(b)), d(x, w, b))
