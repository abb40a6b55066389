import pytest

from tests.multidevice import run_on_devices


@pytest.mark.multidevice
def test_data_parallel_step_equals_single_device():
    # Global-batch semantics: the same jitted step with the batch sharded over 8 devices
    # gives the single-device result.
    run_on_devices("""
import jax, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxopt_suite import train, zoo

model = zoo.MLP(hidden=(16,), num_classes=4)
params = zoo.init_params(model, jax.random.key(0), image_shape=(4, 4, 1))
problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
tx = optax.adam(1e-2)
step = jax.jit(train.make_step(problem, tx))
images = np.asarray(jax.random.randint(jax.random.key(1), (16, 4, 4), 0, 256), np.uint8)
labels = np.asarray(jax.random.randint(jax.random.key(2), (16,), 0, 4), np.int32)
state = train.init_state(params, tx, jax.random.key(3))
ref_state, ref_loss = step(state, images, labels)

mesh = Mesh(np.array(jax.devices()), ("data",))
shard = NamedSharding(mesh, P("data"))
sx, sy = jax.device_put(images, shard), jax.device_put(labels, shard)
assert len(sx.sharding.device_set) == 8
state = jax.device_put(state, NamedSharding(mesh, P()))
out_state, loss = step(state, sx, sy)
np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
for a, b in zip(jax.tree.leaves(out_state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("ok")
""")
