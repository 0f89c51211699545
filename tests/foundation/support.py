"""Stand-ins for the foundation-model tests: a tiny random BERT directory and a tiny spam corpus
(the real MiniLM and SpamAssassin are used by the slow test, the example and the benchmark)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPAM_WORDS = "free money win prize offer click now cash credit cheap viagra urgent winner".split()
HAM_WORDS = "meeting project code review lunch team report thanks schedule patch release notes".split()


def write_tiny_corpus(folder: Path, ham: int = 160, spam: int = 80, seed: int = 0) -> Path:
    """ham/*.txt and spam/*.txt: short RFC 822 messages whose words tell the class apart."""
    rng = np.random.default_rng(seed)
    for sub, n, words in (("ham", ham, HAM_WORDS), ("spam", spam, SPAM_WORDS)):
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            body = " ".join(rng.choice(words + HAM_WORDS[:2], 12))
            subject = " ".join(rng.choice(words, 3))
            (d / f"{i:05d}.txt").write_text(f"From: a@b.c\nSubject: {subject}\nX-Relay: same\n\n{body}\n", encoding="utf-8")
    return folder


def tiny_bert(folder: Path) -> Path:
    from fleetlearn.pretrained import write_tiny_bert

    return write_tiny_bert(folder, seed=0, words=tuple(SPAM_WORDS + HAM_WORDS))
