"""Character-level models for next-character prediction (``fleetlearn.data.text``).

``char_gru`` follows LEAF's Shakespeare model (Caldas et al. 2018, arXiv:1812.01097; itself
from McMahan et al., AISTATS 2017, Sec. 3: embed 8, 2-layer LSTM of 256, predict the next
character from the last output), made smaller: 1 recurrent layer of ``hidden`` units.

Why the recurrence is written out: ``TorchLearner`` trains and evaluates a whole cohort
with ``torch.func.vmap`` over stacked parameter vectors.  In torch 2.13, ``nn.GRU`` /
``nn.LSTM`` go through vmap under autograd (the fused op is decomposed) but not under
``torch.no_grad`` — evaluation fails with "Batching rule not implemented for
aten::gru.input" and the learner falls back to one client at a time.  The cells below are
the same equations (Cho et al. 2014 for the GRU and Hochreiter & Schmidhuber 1997 for the
LSTM, in torch's gate order and initialisation) built from ``nn.Linear`` and a loop over
time, which vmap batches everywhere; tests check them against ``nn.GRU`` / ``nn.LSTM`` with
copied weights and check batched against client-by-client training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The vocabulary of fleetlearn.data.text: id 0 = unknown, 1..95 = printable ASCII.
# (Repeated, not imported: learners do not depend on data; a test checks they agree.)
TEXT_VOCAB_SIZE = 96


class GRULayer(nn.Module):
    """One GRU layer over (N, L, E) inputs, returning the last hidden state (N, H).

    ``r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)``, ``z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h`` (torch.nn.GRU's
    equations; ``ih.weight`` = ``weight_ih_l0``, ``hh.weight`` = ``weight_hh_l0``, gates r, z, n).
    """

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(input_size, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        _rnn_init(self, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gi = self.ih(x)  # input projections of all steps at once: (N, L, 3H)
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            i_r, i_z, i_n = gi[:, t].chunk(3, dim=-1)
            h_r, h_z, h_n = self.hh(h).chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        return h


class LSTMLayer(nn.Module):
    """One LSTM layer (torch.nn.LSTM's equations, gates i, f, g, o), returning the last hidden state."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(input_size, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        _rnn_init(self, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gi = self.ih(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        c = h
        for t in range(x.shape[1]):
            i, f, g, o = (gi[:, t] + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


def _rnn_init(module: nn.Module, hidden: int) -> None:
    # torch.nn.RNNBase.reset_parameters: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)).
    bound = 1.0 / math.sqrt(hidden)
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


class CharRNN(nn.Module):
    """``x`` (N, L) float char ids -> logits (N, num_classes) for the character after them."""

    def __init__(self, num_classes: int, embed: int = 8, hidden: int = 64, vocab_size: int = TEXT_VOCAB_SIZE, cell: str = "gru"):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = GRULayer(embed, hidden) if cell == "gru" else LSTMLayer(embed, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Ids arrive as floats (the system's (N, F) float32 inputs); out-of-range ids -> the unknown id 0.
        ids = x.long()
        ids = torch.where((ids >= 0) & (ids < self.vocab_size), ids, torch.zeros_like(ids))
        return self.head(self.rnn(self.embed(ids)))


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
