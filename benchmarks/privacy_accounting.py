"""Epsilon of DP-FedAvg by RDP and by PLD for a range of noise multipliers.

    python benchmarks/privacy_accounting.py                 # q = 0.1, 100 rounds, delta = 1e-5
    python benchmarks/privacy_accounting.py --rounds 500 --sampling-rate 0.01

Each round is a Poisson-subsampled Gaussian mechanism (McMahan et al., ICLR
2018) accounted with `fleetlearn.privacy.PrivacyAccountant`, i.e. with
dp-accounting's RdpAccountant and PLDAccountant.  `accounting_table` returns
the rows so `benchmarks/privacy.py` can add an accuracy column per noise
multiplier (from training runs) to the same table.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from fleetlearn.privacy import PrivacyAccountant

NOISE_MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)


def accounting_table(
    noise_multipliers: Sequence[float] = NOISE_MULTIPLIERS,
    sampling_rate: float = 0.1,
    rounds: int = 100,
    delta: float = 1e-5,
    methods: Sequence[str] = ("rdp", "pld"),
) -> list[dict[str, float]]:
    """One row per noise multiplier: ``{"noise_multiplier", "sampling_rate",
    "rounds", "delta", "epsilon_rdp", "epsilon_pld", "seconds_rdp", "seconds_pld"}``
    (the epsilon/seconds keys for the `methods` asked for)."""
    rows = []
    for z in noise_multipliers:
        row: dict[str, float] = {"noise_multiplier": float(z), "sampling_rate": float(sampling_rate), "rounds": int(rounds), "delta": float(delta)}
        for method in methods:
            acc = PrivacyAccountant(delta=delta, accounting=method)
            t0 = time.perf_counter()
            row[f"epsilon_{method}"] = acc.epsilon_after(rounds, sampling_rate, z)
            row[f"seconds_{method}"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, float]], extra_columns: Sequence[tuple[str, str, str]] = ()) -> str:
    """A Markdown table; `extra_columns` are (key, header, format) triples, e.g.
    ``("accuracy", "accuracy", "{:.3f}")`` added by the accuracy benchmark."""
    cols = [("noise_multiplier", "z", "{:g}")]
    for method in ("rdp", "pld"):
        if rows and f"epsilon_{method}" in rows[0]:
            cols.append((f"epsilon_{method}", f"epsilon ({method.upper()})", "{:.3f}"))
    cols.extend(extra_columns)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sampling-rate", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--noise-multipliers", type=float, nargs="+", default=list(NOISE_MULTIPLIERS))
    a = p.parse_args(argv)
    rows = accounting_table(a.noise_multipliers, a.sampling_rate, a.rounds, a.delta)
    print(f"DP-FedAvg privacy: q = {a.sampling_rate:g}, {a.rounds} rounds, delta = {a.delta:g} (Poisson-subsampled Gaussian)\n")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
