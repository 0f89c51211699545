"""The typed task spec: what the server writes is what the device reads, and a spec from
the network that is not well formed is refused with the key named."""

from __future__ import annotations

import json
import math

import pytest

from fleetlearn.learners import FitConfig
from fleetlearn.messages import Task
from fleetlearn.task_spec import (
    MAX_SPEC_BYTES, AdaptiveEntry, ClusteringEntry, LabelHistogramEntry, LocalDPEntry, OversampleEntry, TaskEntry, TaskSpec,
    TaskSpecError, register_task_entry,
)


def full_spec() -> TaskSpec:
    return TaskSpec.of(
        FitConfig(local_epochs=3, batch_size=16, lr=0.2, momentum=0.9, prox_mu=0.01),
        LocalDPEntry(clip_norm=0.5, noise_multiplier=1.1),
        LabelHistogramEntry(classes=10),
        OversampleEntry(noise_std=0.1),
        AdaptiveEntry(policy="pace", wait_for=8, slack=0.05, deadline_s=3.0),
        ClusteringEntry(mode="cfl", clusters=3, active=2, blocks=2, candidates={"4": [0], "7": [0, 1]}),
        None,
        seed=11, partial_work=True,
    )


def test_the_wire_form_round_trips_every_entry():
    spec = full_spec()
    again = TaskSpec.from_json(spec.to_json())
    assert again == spec
    assert again.get(LocalDPEntry).noise_multiplier == 1.1 and again.fit.lr == 0.2 and again.partial_work
    assert again.get(ClusteringEntry).candidates_of(7) == [0, 1] and again.get(ClusteringEntry).candidates_of(99) == [0, 1]
    assert TaskSpec.from_json("") == TaskSpec()  # an empty spec: defaults, no entries
    assert Task(1, 0, b"", "none", spec.to_dict()).spec == spec  # a Task given the wire form parses it


def test_a_client_sees_only_its_own_clustering_candidates():
    seen = json.loads(full_spec().for_client(4).to_json())
    assert seen["clustering"]["candidates"] == {"4": [0]}
    assert "candidates" not in json.loads(full_spec().for_client(5).to_json())["clustering"]


@pytest.mark.parametrize("wire, words", [
    ({"lr": "fast"}, "lr"),
    ({"lr": -1.0}, "lr"),
    ({"batch_size": 0}, "batch_size"),
    ({"momentum": 1.0}, "momentum"),
    ({"local_epochs": 10**9}, "local_epochs"),
    ({"seed": -3}, "seed"),
    ({"teleport": True}, "unknown key(s) ['teleport']"),
    ({"local_dp": {"clip_norm": 0}}, "'local_dp'"),
    ({"local_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "extra": 1}}, "extra"),
    ({"label_histogram": {"classes": 10**9}}, "classes"),
    ({"label_histogram": 10}, "'label_histogram'"),
    ({"adaptive": {"policy": "pace"}}, "wait_for"),
    ({"adaptive": {"policy": "fastest"}}, "policy"),
    ({"clustering": {"mode": "ifca", "clusters": 10**6, "active": 1, "blocks": 1}}, "clusters"),
    ([1, 2, 3], "expected an object"),
])
def test_a_malformed_spec_is_refused_naming_the_key(wire, words):
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_dict(wire) if not isinstance(wire, list) else TaskSpec.from_json(json.dumps(wire))
    assert words in str(err.value)


@pytest.mark.parametrize("text", ['{"lr": NaN}', '{"lr": Infinity}', '{"lr": 1e999}', "{" * 100_000, "not json", '{"lr": 0.1'])
def test_non_numbers_deep_nesting_and_garbage_are_refused(text):
    with pytest.raises(TaskSpecError):
        TaskSpec.from_json(text)


def test_an_oversized_spec_is_refused_before_parsing():
    with pytest.raises(TaskSpecError, match=f"at most {MAX_SPEC_BYTES}"):
        TaskSpec.from_json(" " * (MAX_SPEC_BYTES + 1))


def test_a_feature_registers_its_own_entry_and_names_are_unique():
    @register_task_entry
    class WarmupEntry(TaskEntry):
        name = "test_warmup"
        steps: int = 1

    spec = TaskSpec.of(FitConfig(), WarmupEntry(steps=4))
    assert TaskSpec.from_json(spec.to_json()).get(WarmupEntry).steps == 4
    assert TaskSpec().get(WarmupEntry) is None
    with pytest.raises(ValueError, match="already registered"):
        register_task_entry(type("Other", (TaskEntry,), {"name": "test_warmup", "__annotations__": {}}))
    with pytest.raises(ValueError, match="core task key"):
        register_task_entry(type("Lr", (TaskEntry,), {"name": "lr", "__annotations__": {}}))


def test_a_task_refuses_anything_but_a_spec():
    with pytest.raises(TypeError, match="TaskSpec"):
        Task(1, 0, b"", "none", 42)  # type: ignore[arg-type]
    assert not math.isnan(full_spec().fit.lr)
