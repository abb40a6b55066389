"""The sharding helpers in-process, on the one device of the test process.

The equality of sharded and single-device training steps (replicated and FSDP, every method,
``global_batch``) is checked on 8 simulated devices in ONE subprocess by
``tests/test_scaling_out.py::test_every_method_and_api_equals_single_device_on_8_devices``;
here only what needs no extra devices: argument errors, the FSDP layout rule and a one-device
mesh run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_suite import sharding


def test_make_mesh_and_argument_errors():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    with pytest.raises(ValueError, match="at least one device"):
        sharding.make_mesh([])
    step = lambda state, x, y: (state, 0.0)
    with pytest.raises(ValueError, match="'model' is not a mesh axis"):
        sharding.data_parallel(step, {}, mesh, axis="model")
    with pytest.raises(ValueError, match="'model' is not a mesh axis"):
        sharding.global_batch(mesh, np.zeros(4), axis="model")


def test_fsdp_sharding_splits_the_largest_divisible_axis():
    # The rule, independent of the devices present: an abstract 4-device mesh.
    mesh = jax.sharding.AbstractMesh((4,), ("data",))
    tree = {
        "kernel": jnp.zeros((6, 8)),  # 8 is the only axis divisible by 4
        "square": jnp.zeros((12, 16)),  # both divisible: the larger one
        "bias": jnp.zeros(3),  # none: replicated
        "scalar": jnp.zeros(()),
        "key": jax.random.key(0),  # PRNG keys: replicated
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.fsdp_sharding(tree, mesh))
    assert specs == {
        "kernel": P(None, "data"),
        "square": P(None, "data"),
        "bias": P(),
        "scalar": P(),
        "key": P(),
    }


def test_one_device_mesh_step_equals_plain_jit():
    # data_parallel on a one-device mesh is the plain step (donation included).
    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    tx = optax.sgd(0.1)

    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    ref, ref_loss = jax.jit(step)((params, tx.init(params)), x, y)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = (jax.tree.map(jnp.array, params), tx.init(params))
    for shard_params in (False, True):
        sharded, placed = sharding.data_parallel(step, state, mesh, shard_params=shard_params)
        got, loss = sharded(placed, x, y)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        np.testing.assert_allclose(got[0]["w"], ref[0]["w"], rtol=1e-6)
        state = (jax.tree.map(jnp.array, params), tx.init(params))
