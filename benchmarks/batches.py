"""Input batches the benchmarks share."""

from __future__ import annotations

import numpy as np


def mnist_batch(n: int):
    """The first ``n`` MNIST training images (normalised) and labels (int32), or, where the
    dataset is not installed, ``n`` random images and labels of the same shapes and dtypes.
    jax is imported here, not at module level, so that the PyTorch workers that import the
    benchmark modules never load it."""
    import jax.numpy as jnp

    from jaxopt_suite import data as data_lib

    try:
        ds = data_lib.load_mnist()
        images, labels = ds.train_images[:n], ds.train_labels[:n]
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 28, 28), np.uint8)
        labels = rng.integers(0, 10, n).astype(np.int32)
    return data_lib.normalize(jnp.asarray(images)), jnp.asarray(labels, jnp.int32)
