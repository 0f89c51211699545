"""Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020, Sec. 5.1; `generate_synthetic` in their repo).

Per device k: n_k = int(lognormal(4, 2)) + 50 examples; u_k ~ N(0, alpha); W_k (dim x classes)
and b_k ~ N(u_k, 1); B_k ~ N(0, beta); v_k[j] ~ N(B_k, 1); x ~ N(v_k, Sigma) with diagonal
Sigma_jj = (j+1)^-1.2; y = argmax(softmax(x W_k + b_k)).  alpha controls how much the local
models differ, beta how much the local inputs differ.  The IID variant shares one W, b ~ N(0, 1)
and sets v_k = 0 for every device.  (alpha, beta are standard deviations, as in numpy.random.normal.)

Note, true of the original too: u_k is the mean of every entry of W_k and b_k, so it adds
u_k * (sum_j x_j + 1) to all logits of an example alike and never changes its label; with the
same seed, alpha alone leaves the data unchanged.  beta (through v_k) is what skews labels.
"""

from __future__ import annotations

import numpy as np

# lognormal(4, 2) has a heavy tail (P(n_k > 20,000) ~ 0.2% per device): cap a device's size so
# that a large population cannot blow up memory.  FedProx's own 30 devices are far below it.
MAX_DEVICE_EXAMPLES = 20_000
# Examples per block when computing x W_k: bounds the gathered (block, dim, classes) weights.
_BLOCK = 8192


def generate_synthetic(
    num_devices: int,
    alpha: float,
    beta: float,
    iid: bool,
    dim: int,
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (N, dim) float32, y (N,) int64, device (N,) int64), examples grouped by device."""
    sizes = np.minimum(rng.lognormal(4, 2, num_devices).astype(np.int64) + 50, MAX_DEVICE_EXAMPLES)
    model_mean = rng.normal(0, alpha, num_devices)  # u_k
    input_mean_center = rng.normal(0, beta, num_devices)  # B_k
    if iid:
        input_mean = np.zeros((num_devices, dim))
        weights = rng.normal(0, 1, (1, dim, num_classes))
        biases = rng.normal(0, 1, (1, num_classes))
    else:
        input_mean = rng.normal(input_mean_center[:, None], 1, (num_devices, dim))  # v_k
        weights = rng.normal(model_mean[:, None, None], 1, (num_devices, dim, num_classes))
        biases = rng.normal(model_mean[:, None], 1, (num_devices, num_classes))

    device = np.repeat(np.arange(num_devices, dtype=np.int64), sizes)
    input_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = (j+1)^-1.2
    x = input_mean[device] + rng.standard_normal((len(device), dim)) * input_std
    # argmax(softmax(z)) == argmax(z): the softmax of the paper does not change the label.
    if iid:
        y = (x @ weights[0] + biases[0]).argmax(axis=1)
    else:
        y = np.empty(len(device), dtype=np.int64)
        for start in range(0, len(device), _BLOCK):
            rows = slice(start, start + _BLOCK)
            logits = np.einsum("nd,ndc->nc", x[rows], weights[device[rows]]) + biases[device[rows]]
            y[rows] = logits.argmax(axis=1)
    return x.astype(np.float32), y, device
