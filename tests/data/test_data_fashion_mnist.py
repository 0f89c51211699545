"""Fashion-MNIST from IDX files: the parser on files written here, and the missing-files message."""

import gzip
import struct

import numpy as np
import pytest

import fleetlearn.data.fashion_mnist as fashion_mnist
from fleetlearn.config import DataConfig
from fleetlearn.data import DataError, load_federated
from fleetlearn.data.fashion_mnist import read_idx

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float64): 0x0E}


def write_idx(path, array, gz=False):
    """The IDX format, written independently of the parser: magic, big-endian dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, _TYPE_CODES[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([70000, -5, 3], dtype=np.int32),  # multi-byte values catch a wrong byte order
    np.array([[0.5, -1e300]], dtype=np.float64),
])
def test_read_idx_round_trips(tmp_path, gz, array):
    write_idx(tmp_path / "a", array, gz)
    parsed = read_idx(tmp_path / "a")
    assert parsed.dtype == array.dtype and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    write_idx(tmp_path / "full", np.zeros((4, 5), dtype=np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "full").read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shape \(4, 5\) needs 20 data bytes, the file has 17"):
        read_idx(tmp_path / "cut")


def write_fashion_mnist(folder, n_train=40, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / (f"{prefix}-images-idx3-ubyte" + (".gz" if gz else "")), images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=False)  # mixed gz / plain
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_a_folder(tmp_path, gz):
    folder = write_fashion_mnist(tmp_path / "fm", gz=gz)
    data = load_federated(DataConfig(dataset="fashion_mnist", path=str(folder), clients=4, partition="iid"), 0)
    assert data.name == "fashion_mnist" and data.num_features == 784 and data.num_classes == 10
    assert len(data.x) == 40 and len(data.central_x) == 10  # t10k is the central test set
    np.testing.assert_array_equal(data.central_y, np.arange(10))
    raw = read_idx(next(folder.glob("train-images*")))
    np.testing.assert_allclose(data.x.numpy(), raw.reshape(40, 784) / 255.0, rtol=1e-6)
    assert data.x.max() == 1.0 and data.x.min() >= 0.0


def test_missing_default_folder_says_how_to_get_the_files(tmp_path, monkeypatch):
    absent = tmp_path / "absent"
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", absent)
    with pytest.raises(DataError) as err:
        load_federated(DataConfig(dataset="fashion_mnist"), 0)
    message = str(err.value)
    assert str(absent) in message and "does not exist" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.path" in message


def test_missing_file_is_named(tmp_path):
    folder = write_fashion_mnist(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[.gz\] not found in data.path = .*apt-get install"):
        load_federated(DataConfig(dataset="fashion_mnist", path=str(folder)), 0)
