"""The model registry on a real run store (SQLite through SQLAlchemy)."""

import math

import pytest
import torch
from sqlalchemy import text

from fleetlearn.ops import ModelRegistry, RunStore, StoreError
from fleetlearn.records import RoundRecord


def _round(r, version, parent, status="ok", **extra):
    rec = RoundRecord(round=r, version=version, parent_version=parent, status=status, accuracy=0.5 + r / 100, loss=1.0 / r)
    rec.extra.update(extra)
    return rec


def _store_with_rounds(tmp_path, url=None):
    s = RunStore.create(tmp_path / "runs", "seed = 0\n", "cfg0", url=url)
    s.commit_round(_round(1, 1, 0), torch.full((4,), 1.0))
    s.commit_round(_round(2, 2, 1), torch.full((4,), 2.0))
    # Round 3 made version 3, which a guardrail rejected (the round records version 2 again).
    rb = _round(3, 2, 2, status="rolled_back", rejected_version=3, rejected_accuracy=0.1, rejected_loss=9.0)
    rb.reason = "guardrail: divergence: loss 9 > 1.5 x best"
    s.commit_round(rb, torch.full((4,), 2.0))
    s.commit_round(_round(4, 4, 2), torch.full((4,), 4.0))
    s.commit_round(RoundRecord(round=5, version=4, status="failed", reason="no replies"))  # no new version
    return s


def test_versions_have_lineage_config_hash_metrics_and_the_automatic_rolled_back_tag(tmp_path):
    reg = ModelRegistry(_store_with_rounds(tmp_path))
    vs = {v.version: v for v in reg.versions()}
    assert sorted(vs) == [1, 2, 3, 4]
    assert [vs[v].parent_version for v in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert {v.config_hash for v in vs.values()} == {"cfg0"}
    assert vs[3].status == "rolled_back" and vs[3].tags == ["rolled_back"] and not vs[3].has_checkpoint
    assert vs[3].accuracy == pytest.approx(0.1) and vs[3].metrics["restored_version"] == 2
    assert vs[4].status == "committed" and vs[4].tags == [] and vs[4].accuracy == pytest.approx(0.54)
    assert reg.lineage(4) == [4, 2, 1, 0]  # 3 was rejected: not an ancestor
    assert "divergence" in [h for h in reg.tag_history() if h["version"] == 3][0]["reason"]


def test_production_is_exclusive_and_rollback_returns_to_the_previous_one(tmp_path):
    reg = ModelRegistry(_store_with_rounds(tmp_path))
    assert reg.promote(1) is None
    assert reg.promote(2) == 1 and reg.production() == 2
    assert reg.promote(4) == 2
    tags = {v.version: v.tags for v in reg.versions()}
    assert tags[4] == ["production"] and tags[2] == [] and tags[1] == []
    assert reg.rollback() == (4, 2)
    tags = {v.version: v.tags for v in reg.versions()}
    assert tags[2] == ["production"] and tags[4] == ["rolled_back"]
    # The next rollback skips 4 (rolled back) and goes to 1.
    assert reg.rollback() == (2, 1)
    with pytest.raises(StoreError, match="was rolled back"):
        reg.promote(3)
    with pytest.raises(StoreError, match="no model version 99"):
        reg.promote(99)
    with pytest.raises(StoreError, match="unknown tag"):
        reg.tag(1, "gold")
    with pytest.raises(StoreError, match="first production version"):
        reg.rollback()


def test_a_store_written_before_the_registry_derives_its_versions(tmp_path):
    s = _store_with_rounds(tmp_path)
    with s.engine.begin() as conn:  # what a store of an older release looks like: no registry tables
        conn.execute(text("DROP TABLE model_versions"))
        conn.execute(text("DROP TABLE model_tags"))
    reg = ModelRegistry(RunStore.open(s.run_dir))
    vs = {v.version: v for v in reg.versions()}
    assert sorted(vs) == [1, 2, 3, 4] and vs[3].status == "rolled_back" and vs[4].parent_version == 2
    assert vs[1].config_hash == "cfg0" and vs[1].has_checkpoint
    reg.promote(4)  # the re-created tag table works
    assert reg.production() == 4


def test_registry_on_a_store_given_by_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    s = _store_with_rounds(tmp_path, url=url)
    other = RunStore.create(tmp_path / "runs", "seed = 1\n", "cfg1", url=url)
    other.commit_round(_round(1, 1, 0), torch.zeros(4))
    ModelRegistry(other).promote(1)
    reg = ModelRegistry(RunStore.open(s.run_dir))
    assert [v.version for v in reg.versions()] == [1, 2, 3, 4] and reg.production() is None  # runs do not mix
    assert [v.config_hash for v in ModelRegistry(other).versions()] == ["cfg1"]


def test_export_writes_named_tensors_and_lineage_metadata(tmp_path):
    from safetensors import safe_open

    s = _store_with_rounds(tmp_path)
    reg = ModelRegistry(s)
    out = reg.export(2, tmp_path / "m.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("params"), torch.full((4,), 2.0))  # no spec file: the flat vector
    assert meta["version"] == "2" and meta["lineage"] == "[2, 1, 0]" and meta["config_hash"] == "cfg0"
    with pytest.raises(StoreError, match="no checkpoint for version 3"):
        reg.export(3, tmp_path / "x.safetensors")
    assert not math.isnan(reg.get(4).accuracy)
