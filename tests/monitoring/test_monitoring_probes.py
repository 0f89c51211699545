"""Probe updates: known-answer checks of the live codec, aggregator and server
optimizer each round; a broken part is caught and its round rejected."""

import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.monitoring import ProbeHook
from fleetlearn.monitoring.detectors import alerts_of

SMALL = {"seed": 0, "data": {"clients": 20}, "server": {"rounds": 3, "cohort": 5}, "client": {"local_epochs": 1}, "monitoring": {"probe_updates": 6}}


def _coordinator(**sections):
    cfg = load_config({**SMALL, **sections, "monitoring": {**SMALL["monitoring"], **sections.get("monitoring", {})}})
    return build_coordinator(cfg, store=False)


@pytest.mark.parametrize("server,compression", [
    ({"aggregator": "mean"}, {"uplink": "none"}),
    ({"aggregator": "trimmed_mean", "optimizer": "momentum", "server_lr": 0.5}, {"uplink": "ef | topk:0.1 | q8"}),
    ({"aggregator": "median", "optimizer": "adam", "server_lr": 0.05}, {"uplink": "q4"}),
])
def test_correct_parts_pass_every_probe(server, compression):
    c = _coordinator(server={**SMALL["server"], **server}, compression=compression)
    s = c.run()
    assert [r.extra["probe_updates"]["ok"] for r in s.records] == [True] * 3
    assert all(r.status == "ok" for r in s.records) and not any(a["detector"] == "probe_update" for r in s.records for a in alerts_of(r))


class _OffByOneMean:
    """A plausible aggregation bug: divides the weighted sum by (1 + sum of weights)."""

    name = "mean"
    needs_individual_updates = False

    def aggregate(self, matrix, weights):
        return (weights[:, None] * matrix).sum(0) / (1.0 + weights.sum())


def test_a_broken_aggregator_is_caught_and_its_round_rolled_back():
    c = _coordinator()
    c.run_round()
    good_version, good_params = c.version, c.params
    c.aggregator = _OffByOneMean()
    rec = c.run_round()
    assert rec.extra["probe_updates"]["ok"] is False and "aggregator mean" in rec.extra["probe_updates"]["failures"][0]
    assert rec.status == "rolled_back" and rec.version == good_version and torch.equal(c.params, good_params)
    assert [a["detector"] for a in alerts_of(rec)] == ["probe_update"]


def test_a_broken_codec_is_caught():
    c = _coordinator(compression={"uplink": "q8"})
    original = c.uplink.value.write
    c.uplink.value.write = lambda x, rng: original(-x, rng)  # a sign bug in the value codec, shared with the clients
    rec = c.run_round()
    failures = rec.extra["probe_updates"]["failures"]
    assert failures and all("codec 'q8'" in f and "pointing away" in f for f in failures)
    assert rec.status == "rolled_back"


def test_a_broken_server_optimizer_is_caught_without_rollback_when_told():
    c = _coordinator(monitoring={"probe_updates_rollback": False})
    assert c.server_optimizer.lr.value(c.server_state) == 1.0
    step = c.server_optimizer.step
    c.server_optimizer.step = lambda p, g, s: step(p, g * 2.0 + 1e-3, s)  # a doubled and biased step
    rec = c.run_round()
    fails = rec.extra["probe_updates"]["failures"]
    assert any("zero pseudo-gradient moved the model" in f for f in fails) and any("w + lr g" in f for f in fails)
    assert rec.status == "ok"  # recorded and alerted, not rejected


def test_probe_settings_are_checked():
    with pytest.raises(ValueError, match="at least 2"):
        ProbeHook(1)
    with pytest.raises(ConfigError, match="monitoring.probe_updates"):
        load_config({"monitoring": {"probe_updates": -1}})


def test_the_old_key_names_are_read_with_a_note_and_never_both():
    # `[monitoring] probes` was also `[probes]`'s name (probe clients): renamed to probe_updates.
    import warnings

    from fleetlearn.config import OldKeyNote

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = load_config({"monitoring": {"probes": 4, "probe_rollback": False}})
    assert cfg.monitoring.probe_updates == 4 and cfg.monitoring.probe_updates_rollback is False
    notes = sorted(str(w.message) for w in seen if issubclass(w.category, OldKeyNote))
    assert len(notes) == 2 and notes[0].startswith("monitoring.probe_rollback is an old key, read as monitoring.probe_updates_rollback")
    assert notes[1].startswith("monitoring.probes is an old key, read as monitoring.probe_updates; write monitoring.probe_updates = 4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an older run's config.toml lists every key at its default: silent
        assert load_config({"monitoring": {"probes": 0, "probe_rollback": True}}).monitoring.probe_updates == 0
    with pytest.raises(ConfigError, match="monitoring.probes and monitoring.probe_updates both given"):
        load_config({"monitoring": {"probes": 4, "probe_updates": 4}})
    with pytest.raises(ConfigError, match="monitoring.probe_updates = 1"), pytest.warns(OldKeyNote):
        load_config({"monitoring": {"probes": 1}})
