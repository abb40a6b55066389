"""Data-parallel and FSDP-style execution of a training step on a device mesh.

Every method in jaxopt_suite is written with global-batch semantics: a step computes what it
would compute on one device for the whole batch. ``jax.jit`` with input and output shardings
then runs it SPMD over a :class:`jax.sharding.Mesh`; XLA inserts the collectives (all-reduce
of gradients, of Gram matrices, of curvature sums), and no method carries code of its own for
communication.

Two layouts:

* data parallel: the batch is split along the mesh axis, the training state is replicated;
* ``shard_params=True`` (FSDP-style): additionally every state leaf with an axis divisible by
  the number of devices is split along its largest such axis, so each device holds 1/D of the
  parameters and optimizer state; XLA gathers them where the computation needs them.

Multi-host (several processes, e.g. one per GPU host or TPU VM): run the same script on every
host and, before anything else touches JAX, call::

    jax.distributed.initialize()  # on TPU/SLURM/Kubernetes the arguments are discovered;
    # else: jax.distributed.initialize(coordinator_address="host0:1234",
    #                                  num_processes=P, process_id=i)

``jax.devices()`` then lists the devices of all hosts (``jax.local_devices()`` this host's),
:func:`make_mesh` spans them, and :func:`data_parallel` builds the same SPMD program on every
host. Each host loads only its own rows of the global batch (global batch B, P processes: B/P
rows per host, e.g. ``data.batches`` with a per-host seed or a sharded dataset reader) and
turns them into one global array with :func:`global_batch`
(``jax.make_array_from_process_local_data``); pass those arrays to the sharded step. Outputs
come back replicated, so every host sees the same loss; parameters stay identical on all hosts
because every host runs the same step on the same global batch. What differs from one host:
the initial parameters and PRNG keys must be the same on every host (same seeds), and
anything host-side (printing, checkpoints) should be done by ``jax.process_index() == 0``.
On one machine, :func:`global_batch` with one process is what the tests check.

Precision: the layouts change nothing about dtypes. Every ``compare`` method's step (and
KFLR through ``kronecker.kfac_sgd``) keeps bfloat16 parameters bfloat16; each method widens to
float32 where bfloat16 is not sound and says so in its docstring (AliG's norm and step size,
ProxProp's solve, the curvature engine's loss-Hessian square roots and statistics, the
Kronecker factors and their inverses). ``tests/test_scaling_out.py`` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_suite._typing import PyTree


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices) named ``axis``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Splits the leading (batch) axis across ``axis`` of the mesh."""
    return NamedSharding(mesh, P(axis))


def fsdp_sharding(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """Per-leaf shardings that split each leaf along its largest axis divisible by the mesh size.

    Leaves with no such axis (scalars, small or odd-sized arrays, PRNG keys) are replicated.
    """
    size = mesh.shape[axis]

    def leaf_sharding(x):
        shape = getattr(x, "shape", ())
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            return replicated(mesh)
        candidates = [d for d, n in enumerate(shape) if n % size == 0 and n >= size]
        if not candidates:
            return replicated(mesh)
        dim = max(candidates, key=lambda d: shape[d])
        spec = [None] * len(shape)
        spec[dim] = axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(leaf_sharding, tree)


def global_batch(mesh: Mesh, *local_arrays: Any, axis: str = "data") -> tuple[jax.Array, ...]:
    """Assembles each process's rows into global arrays split along ``axis`` of ``mesh``.

    With P processes, each passes its own ``(B / P, ...)`` rows and gets back the same
    ``(B, ...)`` global arrays (rows in process order), laid out as :func:`data_parallel`
    expects; with one process the arrays are the local ones, placed on the mesh.

    Args:
      mesh: the device mesh (spanning all hosts' devices).
      *local_arrays: this process's rows, host (numpy) or device arrays, same leading size.
      axis: the mesh axis the rows are split along.

    Returns:
      One global ``jax.Array`` per local array.

    Raises:
      ValueError: if ``axis`` is not a mesh axis, or the global leading size is not divisible
        by the devices along ``axis``.
    """
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {tuple(mesh.shape)}")
    sharding = batch_sharding(mesh, axis)
    size = mesh.shape[axis]
    out = []
    for i, local in enumerate(local_arrays):
        local = np.asarray(local)
        rows = local.shape[0] * jax.process_count()
        if rows % size:
            raise ValueError(
                f"local_arrays[{i}]: the global batch of {rows} rows is not divisible by the "
                f"{size} devices of mesh axis {axis!r}"
            )
        out.append(
            jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))
        )
    return tuple(out)


def data_parallel(
    step: Callable,
    state: PyTree,
    mesh: Mesh,
    *,
    axis: str = "data",
    shard_params: bool = False,
    num_batch_args: int = 2,
    donate: bool = True,
) -> tuple[Callable, PyTree]:
    """Jits ``step(state, *batch) -> (state, outputs)`` to run SPMD over ``mesh``.

    Args:
      step: an un-jitted step with global-batch semantics, e.g. ``train.make_step(...)``.
      state: the initial state; it is placed on the mesh and returned. With ``donate`` its
        buffers may be reused, so treat the state passed in as consumed (as with
        ``train.jit_step``).
      mesh: the device mesh (see :func:`make_mesh`).
      axis: the mesh axis the batch is split along.
      shard_params: FSDP-style state sharding (see :func:`fsdp_sharding`) instead of
        replication.
      num_batch_args: how many positional arguments after ``state`` are batch arrays whose
        leading axis is split; their leading size must be divisible by the mesh size.
      donate: donate the state buffers (parameters updated in place).

    Returns:
      ``(sharded_step, placed_state)``; call ``sharded_step(state, *batch)`` with host or device
      arrays: the batch is split across devices; ``outputs`` (any pytree, e.g. the loss) come
      back replicated.

    Example: least squares with SGD; on D devices each holds 8 / D rows of the batch
    (``train.make_step(...)`` is a step of the same form)::

        >>> import jax, jax.numpy as jnp, numpy as np, optax
        >>> tx = optax.sgd(0.1)
        >>> def step(state, x, y):
        ...     params, opt_state = state
        ...     loss_fn = lambda w: jnp.mean((x @ w - y) ** 2)
        ...     loss, grads = jax.value_and_grad(loss_fn)(params)
        ...     updates, opt_state = tx.update(grads, opt_state)
        ...     return (optax.apply_updates(params, updates), opt_state), loss
        >>> params = jnp.zeros(3)
        >>> mesh = make_mesh()
        >>> sharded_step, state = data_parallel(step, (params, tx.init(params)), mesh)
        >>> x, y = np.ones((8, 3), np.float32), np.ones(8, np.float32)
        >>> state, loss = sharded_step(state, x, y)
        >>> float(loss), loss.sharding.is_fully_replicated
        (1.0, True)
        >>> state[0]  # w - 0.1 * 2 * mean((x w - y) x) at w = 0
        Array([0.2, 0.2, 0.2], dtype=float32)
    """
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {tuple(mesh.shape)}")
    state_sharding = (
        fsdp_sharding(state, mesh, axis)
        if shard_params
        else jax.tree.map(lambda _: replicated(mesh), state)
    )
    state = jax.device_put(state, state_sharding)
    in_shardings = (state_sharding, *[batch_sharding(mesh, axis)] * num_batch_args)
    jitted = jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
    size = mesh.shape[axis]

    def sharded_step(state, *batch):
        for i, b in enumerate(batch):
            if len(b) % size:
                raise ValueError(
                    f"batch argument {i} has leading size {len(b)}, not divisible by the "
                    f"{size} devices of mesh axis {axis!r}"
                )
        return jitted(state, *batch)

    sharded_step.jitted = jitted  # for .lower(...) / memory analysis
    return sharded_step, state
