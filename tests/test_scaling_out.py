"""Every method under SPMD sharding equals its single-device self; bfloat16 parameters.

The multi-device checks run on 8 simulated CPU devices in ONE subprocess (JAX starts once),
and every group of checks is one jitted function (all training methods side by side in one
step; all function-level APIs in one call), so each layout costs one compilation rather than
one per method. Inside the body, ``jax.jit`` without shardings runs on one device and is the
reference; the same function jitted with the batch split over the mesh (and the training
state replicated, or FSDP-sharded) must give the same numbers up to float32 reduction order.
"""

import functools

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

# Every training method at once: one combined step runs each method's step on its own state,
# so the whole registry (plus KFLR through kronecker.kfac_sgd and plain Adam) costs one
# compilation per layout instead of one per method and layout. Two steps single-device, then
# the same two steps data parallel on the global batch from `sharding.global_batch` (state
# replicated) and FSDP (state split along its largest divisible axis).
_STEPS = """
from jaxopt_suite import kronecker

registry = methods.registry()
setups = {n: m.build(methods.RunConfig(steps=100, batch_size=16, seed=0))
          for n, m in registry.items() if n not in ("sgd", "sgd-momentum")}

def kflr_gradient(problem, params, batch, key):
    value, grads, factors = kronecker.mlp_value_grad_and_factors(params, *batch)
    return value, grads, {"value": value, "factors": factors}

setups["kflr"] = methods.Setup(kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1),
                               gradient=kflr_gradient)
loose = {"kflr": (1e-4, 1e-5), "kfac": (1e-4, 1e-5)}  # factor inverses amplify rounding
steps, states0, params0 = {}, {}, {}
for name, setup in setups.items():
    model = tiny_model(setup.layers)
    params0[name] = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
    problem = train.Problem(lambda p, x, model=model: model.apply({"params": p}, x))
    steps[name] = train.make_step(problem, setup.tx, setup.gradient)
    states0[name] = train.init_state(params0[name], setup.tx, jax.random.key(3))

def all_steps(states, images, labels):
    out = {n: steps[n](states[n], images, labels) for n in steps}
    return {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}

single = jax.jit(all_steps)
ref, ref_losses = states0, []
for _ in range(2):
    ref, loss = single(ref, images, labels)
    ref_losses.append(loss)
for name in steps:
    assert int(ref[name].skipped) == 0, name
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref[name].params,
                         params0[name])
    assert max(jax.tree.leaves(moved)) > 0, f"{name}: the reference step did not move"

# the multi-host input path (one process): rows assembled into global arrays on the mesh
assert jax.process_count() == 1
gx, gy = sharding.global_batch(mesh, images, labels)
assert gx.shape == images.shape and gy.shape == labels.shape
assert gx.sharding.spec[0] == "data" and len(gx.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(gx), images)
np.testing.assert_array_equal(np.asarray(gy), labels)
try:
    sharding.global_batch(mesh, images[:12])
except ValueError as err:
    assert "divisible" in str(err), err
else:
    raise AssertionError("12 rows on 8 devices must be refused")

for shard_params, batch in ((False, (gx, gy)), (True, (images, labels))):
    sharded, state = sharding.data_parallel(all_steps, copy(states0), mesh,
                                            shard_params=shard_params)
    losses = []
    for _ in range(2):
        state, loss = sharded(state, *batch)
        losses.append(loss)
    for name in steps:
        rtol, atol = loose.get(name, (2e-5, 2e-6))
        what = f"{name} shard_params={shard_params}"
        close([l[name] for l in losses], [l[name] for l in ref_losses], rtol, atol, what)
        close(state[name].params, ref[name].params, rtol, atol, what)
        close(state[name].opt_state, ref[name].opt_state, rtol, atol, what)
        kernel = state[name].params["Dense_0"]["kernel"]  # (16, 16): split 8 ways under FSDP
        assert len(kernel.sharding.device_set) == 8, what
        assert kernel.sharding.is_fully_replicated != shard_params, (what, kernel.sharding)
    print("steps", "fsdp" if shard_params else "replicated", "ok:", " ".join(sorted(steps)))
try:
    sharded(state, images[:12], labels[:12])
except ValueError as err:
    assert "not divisible by the 8 devices" in str(err)
else:
    raise AssertionError("a batch of 12 on 8 devices must be refused")
"""

# Function-level APIs in one jitted function, single device vs batch split over the mesh:
# every curvature quantity (batch quantities stay split along N, sums are over the global
# batch), Kronecker factors (KFLR exact, KFAC MC), forward-gradient directions from a
# replicated key, ProxProp's Gram solves (exact, cg3, cg1).
_FUNCTIONS = """
from jaxopt_suite import curvature, fwdgrad, kronecker, proxprop

model = tiny_model({})
params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
apply = lambda p, x: model.apply({"params": p}, x)
quantities = tuple(curvature.QUANTITIES)
curv = curvature.value_and_grad(apply, loss="cross_entropy", quantities=quantities,
                                mc_samples=2)
loss = lambda p, x, y: train.cross_entropy(apply(p, x), y)
fwd = {(d, s): fwdgrad.forward_grad(loss, num_directions=3, distribution=d, structure=s)
       for d, s in (("normal", "dense"), ("rademacher", "rank_one"))}
w = jax.random.normal(jax.random.key(1), (16, 5))
b = jnp.zeros(5)
modes = ("prox_exact", "prox_cg3", "prox_cg1")

def direction(x, z, mode):
    out = lambda w, b: jnp.vdot(proxprop.proxprop_dense(x, w, b, tau_prox=0.5,
                                                        optimization_mode=mode), z)
    return jax.grad(out, argnums=(0, 1))(w, b)

@jax.jit
def everything(x, y, z, key):
    return {
        "curvature": curv(params, x, y, key=key),
        "kronecker": {name: kronecker.mlp_value_grad_and_factors(params, x, y, mc_samples=mc,
                                                                 key=key)
                      for name, mc in (("kflr", None), ("kfac", 2))},
        "fwdgrad": {f"{d}-{s}": g(key, params, x, y) for (d, s), g in fwd.items()},
        "proxprop": {m: direction(x, z, m) for m in modes},
    }

key = jax.random.key(7)
z = jax.random.normal(jax.random.key(2), (16, 5))
ref = everything(x, labels, z, key)
got = everything(*(jax.device_put(a, rows) for a in (x, labels, z)), key)
for part in ("curvature", "kronecker", "fwdgrad"):
    close(got[part], ref[part], what=part)
close(got["proxprop"], ref["proxprop"], 1e-4, 1e-5, "proxprop")
extras = got["curvature"][2]
# per-sample quantities (leading N) stay split along N; sums and factors are replicated;
# square-root columns (K, N, ...) are checked for their values only.
stat = {n: curvature.QUANTITIES[n].statistic for n in quantities}
for n in quantities:
    for leaf in jax.tree.leaves(extras[n]):
        if stat[n].startswith("individual"):
            assert leaf.shape[0] == 16
            assert leaf.sharding.spec and leaf.sharding.spec[0] == "data", (n, leaf.sharding)
        elif stat[n] != "columns":
            assert leaf.sharding.is_fully_replicated, (n, leaf.sharding)
print("functions ok:", " ".join(quantities))
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_every_method_and_api_equals_single_device_on_8_devices():
    # One subprocess (JAX starts once) with two compilations per layout.
    out = run_on_devices(_PROBLEM + _STEPS + _FUNCTIONS)
    expected = set(methods.registry()) - {"sgd", "sgd-momentum"} | {"kflr"}
    for layout in ("replicated", "fsdp"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"steps {layout} ok:"))
        assert set(line.split(":", 1)[1].split()) == expected, (line, expected)
    line = next(ln for ln in out.splitlines() if ln.startswith("functions ok:"))
    assert set(line.split(":", 1)[1].split()) == set(curvature.QUANTITIES)


# ---------------------------------------------------------------------------------------------
# bfloat16 parameters (single device)

_SHAPE = (4, 4, 1)
_BF16_IMAGES = np.random.default_rng(0).integers(0, 256, (8, 4, 4), dtype=np.uint8)
_BF16_LABELS = np.random.default_rng(1).integers(0, 4, (8,), dtype=np.int32)


def _kflr_setup() -> methods.Setup:
    def gradient(problem, params, batch, key):
        value, grads, factors = kronecker.mlp_value_grad_and_factors(params, *batch)
        return value, grads, {"value": value, "factors": factors}

    return methods.Setup(kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1), gradient=gradient)


@pytest.mark.slow
def test_bfloat16_parameters_keep_their_dtype():
    # Every training method (the registry and KFLR) with bfloat16 parameters, in one combined
    # jitted step (one compilation): two steps keep bfloat16, move the parameters, skip nothing.
    setups = {
        n: m.build(methods.RunConfig(steps=100, batch_size=8, seed=0))
        for n, m in methods.registry().items()
    }
    setups["kflr"] = _kflr_setup()
    steps, states, params0 = {}, {}, {}
    for name, setup in setups.items():
        fields = {k: v for k, v in setup.layers.items() if k in ("dense", "last")}
        model = zoo.MLP(hidden=(8,), num_classes=4, **fields)
        params = zoo.init_params(model, jax.random.key(0), image_shape=_SHAPE)
        params0[name] = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        problem = train.Problem(lambda p, x, model=model: model.apply({"params": p}, x))
        steps[name] = train.make_step(problem, setup.tx, setup.gradient)
        states[name] = train.init_state(params0[name], setup.tx, jax.random.key(1))

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def all_steps(states, images, labels):
        out = {n: steps[n](states[n], images, labels) for n in steps}
        return {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}

    for _ in range(2):
        states, losses = all_steps(states, _BF16_IMAGES, _BF16_LABELS)
    for name, state in states.items():
        dtypes = {str(p.dtype) for p in jax.tree.leaves(state.params)}
        assert dtypes == {"bfloat16"}, (name, dtypes)
        assert int(state.skipped) == 0, name
        moved = [
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
            for a, b in zip(
                jax.tree.leaves(state.params), jax.tree.leaves(params0[name]), strict=True
            )
        ]
        assert max(moved) > 0, name
        assert np.isfinite(float(losses[name])), name


# bfloat16 parameters and activations at the function level: results come back in bfloat16 and
# agree with the float32 computation to bfloat16 precision.


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


@pytest.mark.slow
def test_bfloat16_curvature_quantities():
    # Every quantity; exact ones agree with float32 to bfloat16 precision, MC ones (other
    # draws in another dtype) are checked for dtype and finiteness.
    quantities = tuple(curvature.QUANTITIES)
    apply, params, x, y = _bf16_problem()
    fn = jax.jit(curvature.value_and_grad(apply, loss="cross_entropy", quantities=quantities))
    key = jax.random.key(3)
    value, grads, extras = fn(_bf16(params), _bf16(x), y, key=key)
    ref_value, ref_grads, ref_extras = fn(params, x, y, key=key)
    _agree_in_bf16(value, ref_value)
    _agree_in_bf16(grads, ref_grads)
    for q in quantities:
        assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(extras[q]))
        if curvature.QUANTITIES[q].source == "ggn_mc":  # draws differ with the dtype
            assert {a.dtype for a in jax.tree.leaves(extras[q])} == {jnp.dtype(jnp.bfloat16)}
        else:
            _agree_in_bf16(extras[q], ref_extras[q])


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
