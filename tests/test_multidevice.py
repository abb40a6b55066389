import pytest

from tests.multidevice import run_on_devices


@pytest.mark.multidevice
def test_sharded_steps_equal_single_device():
    # Global-batch semantics: the same step with the batch split over 8 devices (state
    # replicated, or FSDP-sharded) gives the single-device result.
    run_on_devices("""
import jax, jax.numpy as jnp, numpy as np, optax
from jaxopt_suite import sharding, train, zoo

model = zoo.MLP(hidden=(16,), num_classes=4)
params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
tx = optax.adam(1e-2)
step = train.make_step(problem, tx)
images = np.asarray(jax.random.randint(jax.random.key(1), (16, 4, 4), 0, 256), np.uint8)
labels = np.asarray(jax.random.randint(jax.random.key(2), (16,), 0, 4), np.int32)
state0 = train.init_state(params, tx, jax.random.key(3))
ref_state, ref_loss = jax.jit(step)(state0, images, labels)
ref_state, ref_loss = jax.jit(step)(ref_state, images, labels)

mesh = sharding.make_mesh()
for shard_params in (False, True):
    fresh = jax.tree.map(jnp.array, state0)  # copies: the sharded step consumes its state
    sharded, state = sharding.data_parallel(step, fresh, mesh, shard_params=shard_params)
    state, loss = sharded(state, images, labels)
    state, loss = sharded(state, images, labels)
    kernel = state.params["Dense_0"]["kernel"]  # (16, 16): split 8 ways under FSDP
    assert len(kernel.sharding.device_set) == 8
    assert kernel.sharding.is_fully_replicated != shard_params, kernel.sharding
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
try:
    sharded(state, images[:12], labels[:12])
except ValueError as err:
    assert "not divisible by the 8 devices" in str(err)
else:
    raise AssertionError("a batch of 12 on 8 devices must be refused")
print("ok")
""")
