"""RunSummary helpers."""

from __future__ import annotations

import math

from fleetlearn.records import RoundRecord, RunSummary


def _summary(accuracies, seconds):
    records = [RoundRecord(round=i + 1, version=i + 1, accuracy=a, sim_seconds=s) for i, (a, s) in enumerate(zip(accuracies, seconds))]
    return RunSummary(run_id="r", run_dir="", rounds=len(records), final_accuracy=accuracies[-1], best_accuracy=max(accuracies),
                      final_loss=0.0, uplink_bytes=0, downlink_bytes=0, compression_ratio=1.0, sim_seconds=sum(seconds),
                      wall_seconds=0.0, records=records)


def test_seconds_to_counts_every_round_up_to_the_first_that_reaches_the_target():
    s = _summary([0.5, math.nan, 0.8, 0.7, 0.9], [1.0, 2.0, 0.5, 1.0, 1.0])
    assert s.seconds_to(0.8) == 3.5  # rounds 1-3, the unevaluated round 2 included
    assert s.seconds_to(0.85) == 5.5
    assert s.seconds_to(0.5) == 1.0
    assert s.seconds_to(0.95) == math.inf
