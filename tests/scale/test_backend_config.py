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
