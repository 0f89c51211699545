"""deploy/: the artifacts parse, every `fleetlearn ...` command they (and the README's
deployment section) run is one the CLI accepts with exactly those flags, and the only
commands missing from the CLI are the documented pending ones.

Base images cannot be pulled on CI machines, so nothing here builds or starts a container.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from fleetlearn import cli
from fleetlearn.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Subcommands the artifacts use that the CLI does not have yet. When one lands, this set
# must shrink, and its flags are then checked like every other command's.
PENDING: set[str] = set()
SEGMENT = re.compile(r"(?:^[ \t]*|[;&|(]\s*|\bexec\s+)(fleetlearn\s[^;&|>\n]*)", re.M)


def commands_in_text(text: str) -> list[list[str]]:
    return [shlex.split(m.group(1)) for m in SEGMENT.finditer(text)]


def commands_in_yaml(node) -> list[list[str]]:
    if isinstance(node, dict):
        return [c for v in node.values() for c in commands_in_yaml(v)]
    if isinstance(node, list):
        if node and node[0] == "fleetlearn" and all(isinstance(x, str) for x in node):
            return [list(node)]
        return [c for v in node for c in commands_in_yaml(v)]
    if isinstance(node, str):
        return commands_in_text(node)
    return []


def dockerfile_stages() -> dict[str, list[str]]:
    """target -> ENTRYPOINT + CMD (JSON form), inheriting the base stage's ENTRYPOINT."""
    stages, current, entry = {}, None, {}
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line):
            parent, current = m.groups()
            entry[current] = entry.get(parent, [])
            stages[current] = []
        elif m := re.match(r"ENTRYPOINT\s+(\[.*\])", line):
            entry[current] = json.loads(m.group(1))
        elif m := re.match(r"CMD\s+(\[.*\])", line):
            stages[current] = entry[current] + json.loads(m.group(1))
    return stages


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def readme_deployment_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Deployment with containers")
    end = text.index("\n#", start + 5)
    return text[start:end]


def all_commands() -> dict[str, list[list[str]]]:
    out = {"Dockerfile": [c for c in dockerfile_stages().values() if c]}
    for path in [DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
        out[str(path.relative_to(ROOT))] = [c for d in yaml_docs(path) for c in commands_in_yaml(d)]
    blocks = re.findall(r"```sh\n(.*?)```", readme_deployment_section(), re.S)
    out["README.md (Deployment with containers)"] = [c for b in blocks for c in commands_in_text(b)]
    return out


def subcommands() -> set[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_artifact_parses():
    for path in [DEPLOY / "compose.yaml", *DEPLOY.glob("k8s/*.yaml"), *DEPLOY.glob("prometheus/*.yml")]:
        assert yaml_docs(path), path
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]
    assert {"postgres", "server-a", "server-b", "root", "aggregator-0", "aggregator-1", "client-0", "client-1", "prometheus"} <= set(compose["services"])
    for volume in compose["services"]["prometheus"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    kinds = {(d["kind"], d["metadata"]["name"]) for p in DEPLOY.glob("k8s/*.yaml") for d in yaml_docs(p)}
    assert {k for k, _ in kinds} >= {"StatefulSet", "Deployment", "Service", "Secret", "ConfigMap"}
    assert set(dockerfile_stages()) >= {"server", "aggregator", "client"}


def test_the_dockerfile_copies_files_that_exist():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"deploy/Dockerfile: COPY {src}: no such file in the repository"


def test_the_shipped_run_config_loads_and_the_k8s_configmap_is_the_same():
    run_toml = (DEPLOY / "run.toml").read_text()
    config = load_config(tomllib.loads(run_toml))
    assert config.monitoring.prometheus_port == 9100  # what deploy/prometheus/prometheus.yml scrapes
    maps = [d for p in DEPLOY.glob("k8s/*.yaml") for d in yaml_docs(p) if d["kind"] == "ConfigMap"]
    assert [tomllib.loads(m["data"]["run.toml"]) for m in maps] == [tomllib.loads(run_toml)]
    scrape = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]["static_configs"][0]["targets"]
    assert all(t.endswith(":9100") for t in scrape)


def test_every_command_is_one_the_cli_accepts():
    known = subcommands()
    used, missing = set(), set()
    for where, commands in all_commands().items():
        assert commands or where.endswith("secret.yaml"), f"{where}: no fleetlearn command found"
        for argv in commands:
            assert argv[0] == "fleetlearn", (where, argv)
            sub = argv[1]
            used.add(sub)
            if sub not in known:
                missing.add(sub)
                continue
            # every flag and value as written: argparse exits 2 on an unknown flag or a bad value
            try:
                cli.build_parser().parse_args(argv[1:])
            except SystemExit as exc:
                pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by the CLI (exit {exc.code})")
            # and `--help` with those flags prints the subcommand's usage
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
                cli.main(argv[1:] + ["--help"])
            assert exc.value.code == 0 and f"usage: fleetlearn {sub}" in out.getvalue(), (where, argv)
    assert missing == PENDING, f"subcommands missing from the CLI {sorted(missing)}, documented as pending {sorted(PENDING)}"
    assert {"server", "aggregator", "client", "certs", "token"} <= used


def test_the_readme_documents_the_artifacts():
    section = readme_deployment_section()
    for path in ("deploy/Dockerfile", "deploy/compose.yaml", "deploy/k8s/", "deploy/prometheus/alerts.yml", "deploy/run.toml"):
        assert path in section, f"README's deployment section does not mention {path}"
    targets = set(re.findall(r"--target (\S+)", section))
    assert targets and targets <= set(dockerfile_stages()), targets
    for name in PENDING:
        assert name in section and "pending" in section.lower()
