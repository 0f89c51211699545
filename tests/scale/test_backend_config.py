"""`[engine] backend` chooses the transport; Ray stays optional."""

from __future__ import annotations

import sys

import pytest

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine.factory import build_coordinator
from fleetlearn.transport import SimulationTransport


def test_simulation_is_the_default_backend():
    coord = build_coordinator(load_config({"data": {"clients": 10}, "server": {"cohort": 5}}), store=False)
    assert type(coord.transport) is SimulationTransport


def test_ray_backend_without_ray_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cfg = load_config({"data": {"clients": 10}, "server": {"cohort": 5}, "engine": {"backend": "ray"}})
    with pytest.raises(ConfigError, match=r"engine.backend = 'ray'.*pip install \"fleetlearn\[ray\]\""):
        build_coordinator(cfg, store=False)


@pytest.mark.parametrize("address", ["auto", "ray://head:10001", "10.0.0.5:6379", None])
def test_engine_address_forms(address):
    assert load_config({"engine": {"backend": "ray", "address": address}}).engine.address == address


def test_engine_address_is_checked():
    with pytest.raises(ConfigError, match="engine.address"):
        load_config({"engine": {"address": "http://head"}})


class _ThreadProbe:
    def __init__(self):
        self.seen: list[int] = []

    def after_round(self, record, coordinator):
        import torch

        self.seen.append(torch.get_num_threads())


@pytest.mark.parametrize("setting, expected", [("auto", 1), (2, 2)])
def test_engine_threads_apply_during_the_run_and_are_restored(setting, expected):
    import torch

    before = torch.get_num_threads()
    probe = _ThreadProbe()
    cfg = load_config({"data": {"clients": 6}, "server": {"cohort": 3, "rounds": 2}, "client": {"local_epochs": 1}, "engine": {"threads": setting}})
    build_coordinator(cfg, store=False, hooks=[probe]).run()
    assert probe.seen == [expected, expected]  # the small default MLP (9,610 parameters) runs on one thread under "auto"
    assert torch.get_num_threads() == before


def test_engine_threads_refuses_a_negative_count():
    with pytest.raises(ConfigError, match="engine.threads = -1"):
        load_config({"engine": {"threads": -1}})
