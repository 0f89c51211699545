"""The planted-cluster problem the clustering tests share: digits, label permutations per group."""

from __future__ import annotations

CLIENTS = 20


def planted_config(clustering: str, groups: int, rounds: int = 8, **server) -> dict:
    return {
        "seed": 0,
        "data": {"dataset": "digits", "clients": CLIENTS, "partition": "label_permutation", "groups": groups},
        "client": {"local_epochs": 2},
        "server": {"rounds": rounds, "cohort": CLIENTS, "eval_clients": 0, "clustering": clustering, "clusters": max(groups, 2), **server},
        "monitoring": {"debug": False, "detectors": []},
    }
