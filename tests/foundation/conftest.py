from __future__ import annotations

import sys
from pathlib import Path

import importlib.util

import pytest

# The optional [lora] extra (transformers, tokenizers, safetensors): without it these tests
# are not collected (`make` installs it, so CI runs them).
if any(importlib.util.find_spec(m) is None for m in ("transformers", "tokenizers", "safetensors")):
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import tiny_bert, write_tiny_corpus  # noqa: E402


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def spam_dir(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("spam"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
