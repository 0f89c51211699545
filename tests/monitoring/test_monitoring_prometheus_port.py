"""A Prometheus port taken after the config was checked is a named error, not a traceback."""

import socket

import pytest
import tomli_w

import fleetlearn.api as api
import fleetlearn.cli as cli
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def config(port: int) -> dict:
    return {"data": {"clients": 10}, "server": {"rounds": 1, "cohort": 3}, "monitoring": {"prometheus_port": port}}


def test_a_port_taken_between_build_and_run_is_named():
    port = free_port()
    c = build_coordinator(load_config(config(port)), store=False)  # free while the config is checked
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(ConfigError, match=f"monitoring.prometheus_port = {port}: cannot serve /metrics on 127.0.0.1:{port}"):
            c.run()


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config(port)))
    held = []
    real = api.build

    def build_then_take_the_port(*args, **kwargs):
        out = real(*args, **kwargs)
        held.append(socket.create_server(("127.0.0.1", port)))
        return out

    monkeypatch.setattr(api, "build", build_then_take_the_port)  # what `fleetlearn run` builds with
    try:
        assert cli.main(["run", str(path), "--quiet", "--runs-dir", str(tmp_path / "runs")]) == 2
    finally:
        for s in held:
            s.close()
    err = capsys.readouterr().err
    assert f"monitoring.prometheus_port = {port}" in err and "Traceback" not in err
