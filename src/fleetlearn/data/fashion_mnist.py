"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) from local IDX files.

No download at run time: the files come from Debian's package `dataset-fashion-mnist`
(installed to `/usr/share/datasets/fashion-mnist/*.gz`) or from a folder given as `data.path`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fleetlearn.data.errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = 10
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "Get the files with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them to "
    f"{DEFAULT_DIR}), or put {', '.join(f + '.gz' for f in IDX_FILES.values())} "
    "(from https://github.com/zalandoresearch/fashion-mnist; gzipped or plain) in a folder and set data.path to it."
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or plain, told apart by content) into a native-endian array.

    Header: two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follow, big-endian, row-major.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header says {ndim} dimensions but the file ends at byte {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX shape {shape} needs {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """`stem`, `stem.gz`, or the same with the '.' spelling some mirrors use (train-images.idx3-ubyte)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(path: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): pixels scaled to [0, 1] and flattened to 784 float32; labels int64."""
    folder = Path(path) if path is not None else DEFAULT_DIR
    where = f"data.path = {str(folder)!r}" if path is not None else f"{folder} (the default; data.path is not set)"
    if not folder.is_dir():
        raise DataError(f"fashion_mnist: folder {where} does not exist. {HOW_TO_GET}")
    found = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] + "[.gz]" for key, file in found.items() if file is None]
    if missing:
        raise DataError(f"fashion_mnist: {', '.join(missing)} not found in {where}. {HOW_TO_GET}")
    arrays = {key: read_idx(file) for key, file in found.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"fashion_mnist: {split} images have shape {images.shape} and labels {labels.shape}; "
                "expected (n, rows, cols) images and (n,) labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise DataError(f"fashion_mnist: {split} labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
        x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
        out += [x, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
