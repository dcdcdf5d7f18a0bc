"""Datasets: real Fashion-MNIST from Debian, IDX/npz readers on files written here."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.data import load_client_data, load_npz, resolve_data_path
from common.datasets import DEBIAN_FASHION_MNIST, DataError, load_dataset, read_idx


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _write_mnist_like(root: Path, n_train=50, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in files.items():
        _write_idx(root / (name + (".gz" if gz else "")), arr, gz)
    return files


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists() and not os.environ.get("CI"),
                    reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_from_debian_files():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.spec.num_classes == 10 and np.bincount(ds.y_train).tolist() == [6000] * 10
    assert abs(float(ds.x_train.mean())) < 1e-3  # standardised


def test_idx_reader_plain_gz_and_truncated(tmp_path):
    arr = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), arr)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "c")


def test_mnist_from_torchvision_layout_in_data_dir(tmp_path):
    files = _write_mnist_like(tmp_path / "MNIST" / "raw", gz=False)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (50, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, files["train-labels-idx1-ubyte"])


def test_cifar_files_that_fail_the_md5_check_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not the real file")
    with pytest.raises(DataError, match="data-dir"):
        load_dataset("cifar10", str(tmp_path))


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 30)
    np.savez(tmp_path / "c0.npz", x=x, y=y)
    ds = load_npz(tmp_path / "c0.npz")
    assert ds.x_train.shape == (30, 3, 12, 12) and ds.spec.channels == 3
    np.savez(tmp_path / "bad.npz", x=x, y=y[:5])
    with pytest.raises(DataError, match="one per image"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nox.npz", images=x, y=y)
    with pytest.raises(DataError, match="no array 'x'"):
        load_npz(tmp_path / "nox.npz")
    obj = np.empty(2, dtype=object)
    np.savez(tmp_path / "pickled.npz", x=obj, y=y[:2])
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "pickled.npz")  # allow_pickle=False
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_npz_client_split_and_partition_placeholder(tmp_path):
    rng = np.random.default_rng(1)
    for pid in range(2):
        np.savez(tmp_path / f"client{pid}.npz", x=rng.normal(size=(40, 8, 8)).astype(np.float32),
                 y=rng.integers(0, 3, 40))
    template = str(tmp_path / "client{partition-id}.npz")
    assert resolve_data_path(template, 1).endswith("client1.npz")
    cfg = load_config({"dataset": "npz", "data-path": template})
    data = load_client_data(cfg, 1, 2)
    assert len(data.y_train) == 30 and len(data.y_test) == 10


def test_builtin_client_data_is_a_seeded_split_of_its_partition():
    cfg = load_config({"dataset": "digits", "partitioner": "iid"})
    a, b = load_client_data(cfg, 0, 3), load_client_data(cfg, 1, 3)
    assert len(a.y_train) + len(a.y_test) == pytest.approx(1437 / 3, abs=1)
    assert len(a.y_test) == pytest.approx(0.25 * (len(a.y_train) + len(a.y_test)), abs=1)
    assert not np.array_equal(a.x_train[:5].numpy(), b.x_train[:5].numpy())
    with pytest.raises(DataError, match="partition-id 5"):
        load_client_data(cfg, 5, 3)


def test_npz_nodes_map_the_same_pixel_to_the_same_input(tmp_path):
    """Two nodes with very different images: pixel value 128 in channel 1 becomes the same
    input on both, (128/255 - mean) / std with the federation's declared values."""
    dark = np.zeros((20, 6, 6, 3), np.uint8)
    bright = np.full((40, 6, 6, 3), 250, np.uint8)
    for x in (dark, bright):
        x[0, 2, 3, 1] = 128
    np.savez(tmp_path / "dark.npz", x=dark, y=np.zeros(20, np.int64))
    np.savez(tmp_path / "bright.npz", x=bright, y=np.ones(40, np.int64))
    expected = (128 / 255 - 0.25) / 0.5  # 0.50392...
    for name in ("dark", "bright"):
        ds = load_npz(tmp_path / f"{name}.npz", mean=(0.5, 0.25, 0.0), std=(0.5,))
        assert ds.x_train[0, 1, 2, 3] == pytest.approx(expected, abs=1e-6)
        assert ds.x_train[1, 0, 0, 0] == pytest.approx(((250 if name == "bright" else 0)
                                                        / 255 - 0.5) / 0.5, abs=1e-6)
    # defaults: uint8 to [0, 1] and nothing else
    assert load_npz(tmp_path / "dark.npz").x_train[0, 1, 2, 3] == pytest.approx(128 / 255)
    with pytest.raises(DataError, match="'npz-mean' has 2 values: expected 1 or 3"):
        load_npz(tmp_path / "dark.npz", mean=(0.1, 0.2))


def _labelled(tmp_path, name: str, y: np.ndarray, **extra) -> Path:
    """An npz file of len(y) 4x4 uint8 images with labels ``y``."""
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=np.zeros((len(y), 4, 4), np.uint8), y=y, **extra)
    return path


@pytest.mark.parametrize(
    ("name", "labels", "num_classes", "message"),
    [
        # 2**63 as uint64 would wrap to -2**63 after the int64 cast
        ("wraps", np.array([3, 2**63, 1], np.uint64), 0,
         "'y'[1] = 9223372036854775808 is not a label: expected an integer in [0, 100000)"),
        ("negative", np.array([0, 1, 2, -1], np.int64), 0,
         "'y'[3] = -1 is not a label: expected an integer in [0, 100000)"),
        # an honest file's typo would make the server build a 10**9-way output layer
        ("typo", np.array([0, 10**9, 1, 10**9]), 0,
         "'y'[1] = 1000000000 is not a label: expected an integer in [0, 100000) "
         "(num-classes = 0 allows at most MAX_CLASSES = 100000 classes)"),
        ("above-num-classes", np.array([0, 1, 9, 10], np.uint8), 10,
         "'y'[3] = 10 is not a label: expected an integer in [0, 10) "
         "(run-config key 'num-classes' = 10)"),
        ("floats", np.array([0.0, 1.0, 2.0]), 0, "'y' must be 1-D integer labels"),
        ("bools", np.array([True, False, True]), 0, "'y' must be 1-D integer labels"),
    ],
    ids=["uint64-2**63", "int64--1", "typo-10**9", "above-num-classes", "floats", "bools"],
)
def test_npz_labels_are_checked_in_their_own_dtype(tmp_path, name, labels, num_classes,
                                                   message):
    path = _labelled(tmp_path, name, labels)
    with pytest.raises(DataError) as err:
        load_npz(path, num_classes=num_classes)
    assert str(err.value).startswith(f"data file {path}: ")  # names the file
    assert message in str(err.value)


def test_npz_test_labels_are_checked_too(tmp_path):
    path = _labelled(tmp_path, "test-split", np.array([0, 1]),
                     x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.array([1, -5], np.int16))
    with pytest.raises(DataError, match=r"'y_test'\[1\] = -5 is not a label"):
        load_npz(path)


def test_honest_npz_labels_load_intact(tmp_path):
    labels = np.array([0, 4, 99_999, 2, 7], np.uint32)  # 99_999: the largest one allowed
    ds = load_npz(_labelled(tmp_path, "honest", labels))
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [0, 4, 99999, 2, 7]
    assert ds.spec.num_classes == 100_000
    exact = load_npz(_labelled(tmp_path, "ten", np.arange(10, dtype=np.uint64)), num_classes=10)
    assert exact.y_train.tolist() == list(range(10)) and exact.spec.num_classes == 10


def test_client_data_bounds_npz_labels_by_num_classes(tmp_path):
    path = _labelled(tmp_path, "node", np.array([0, 1, 2, 3, 4, 5, 6, 7]))
    ok = load_client_data(load_config({"dataset": "npz", "data-path": str(path)}), None, 1)
    assert sorted(ok.y_train.tolist() + ok.y_test.tolist()) == list(range(8))
    cfg = load_config({"dataset": "npz", "data-path": str(path), "num-classes": 5})
    with pytest.raises(DataError, match=r"'y'\[5\] = 5 is not a label: expected an integer "
                                        r"in \[0, 5\) \(run-config key 'num-classes' = 5\)"):
        load_client_data(cfg, None, 1)
