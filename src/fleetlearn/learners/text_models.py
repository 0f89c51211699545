"""Character-level models for next-character prediction (``fleetlearn.data.text``).

``char_gru`` follows LEAF's Shakespeare model (Caldas et al. 2018, arXiv:1812.01097; itself
from McMahan et al., AISTATS 2017, Sec. 3: embed 8, 2-layer LSTM of 256, predict the next
character from the last output), made smaller: 1 recurrent layer of ``hidden`` units.

Batched training: ``torch.func.vmap`` over stacked parameter vectors works with ``nn.GRU``
and ``nn.LSTM`` in torch 2.x (functorch decomposes the fused RNN op into cell steps), so
``TorchLearner`` trains a cohort as one computation; tests check that it matches
client-by-client training.  Were vmap to refuse a model, ``TorchLearner`` falls back to
training clients one by one (with a warning).
"""

from __future__ import annotations

import torch
from torch import nn

# The vocabulary of fleetlearn.data.text: id 0 = unknown, 1..95 = printable ASCII.
# (Repeated, not imported: learners do not depend on data; a test checks they agree.)
TEXT_VOCAB_SIZE = 96


class CharRNN(nn.Module):
    """``x`` (N, L) float char ids -> logits (N, num_classes) for the character after them."""

    def __init__(self, num_classes: int, embed: int = 8, hidden: int = 64, vocab_size: int = TEXT_VOCAB_SIZE, cell: str = "gru"):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Ids arrive as floats (the system's (N, F) float32 inputs); out-of-range ids -> the unknown id 0.
        ids = x.long()
        ids = torch.where((ids >= 0) & (ids < self.vocab_size), ids, torch.zeros_like(ids))
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def char_gru(num_features: int, num_classes: int, embed: int = 8, hidden: int = 64, vocab_size: int = TEXT_VOCAB_SIZE) -> nn.Module:
    """Embedding(vocab_size, embed) -> 1-layer GRU(hidden) -> Linear(hidden, num_classes) on the
    last step.  ``num_features`` is the sequence length (any length works; it is not a weight shape)."""
    if num_features < 1:
        raise ValueError(f"char_gru needs sequences of length >= 1, got num_features = {num_features}")
    return CharRNN(num_classes, embed, hidden, vocab_size, cell="gru")


def char_lstm(num_features: int, num_classes: int, embed: int = 8, hidden: int = 64, vocab_size: int = TEXT_VOCAB_SIZE) -> nn.Module:
    """As ``char_gru`` with an LSTM cell (LEAF's choice)."""
    if num_features < 1:
        raise ValueError(f"char_lstm needs sequences of length >= 1, got num_features = {num_features}")
    return CharRNN(num_classes, embed, hidden, vocab_size, cell="lstm")
