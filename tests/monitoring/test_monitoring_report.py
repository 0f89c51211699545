import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fleetlearn.monitoring.report import PLOTS, render_plots, write_report
from fleetlearn.records import RoundRecord


def test_report_of_a_real_run_has_every_plot_non_blank(guarded_run):
    html_path = write_report(guarded_run.summary.run_dir)
    assert html_path == Path(guarded_run.summary.run_dir) / "report" / "report.html"
    page = html_path.read_text()
    referenced = re.findall(r"<img src='([^']+\.png)'", page)
    assert referenced == [f"{name}.png" for name in PLOTS]
    for name in referenced:
        img = imread(html_path.parent / name)
        h, w = img.shape[:2]
        assert w == 1100 and h >= 360, (name, img.shape)
        assert float(np.var(img[..., :3])) > 1e-3, f"{name} is blank"
        # Rollbacks are drawn as red bands: some pixels are that pinkish red.
        rgb = img[..., :3]
        pink = (rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.75) & (rgb[..., 1] < 0.9) & (rgb[..., 2] > 0.75) & (rgb[..., 2] < 0.9)
        assert pink.sum() > 100, f"{name} does not show the rollbacks"
    # The rollbacks and their alerts are listed, with the round numbers.
    rollbacks = page.split("<h2>Rollbacks</h2>")[1].split("<h2>")[0]
    for r in (4, 5):
        assert f"<td>{r}</td>" in rollbacks
    assert "guardrail: divergence" in rollbacks and "critical" in page


def test_report_goes_where_asked(guarded_run, tmp_path, monkeypatch):
    import fleetlearn.monitoring.report as report

    monkeypatch.setattr(report, "render_plots", lambda records, out: [out / f"{n}.png" for n in PLOTS])  # plots tested above
    path = write_report(guarded_run.summary.run_dir, tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "report.html" and path.is_file()


def test_plots_survive_records_without_measurements(tmp_path):
    # A run without monitoring hooks, with unevaluated rounds: every plot still renders.
    recs = [RoundRecord(round=i, version=i, selected=5, accepted=5, uplink_bytes=100) for i in (1, 2, 3)]
    recs[2].status = "failed"
    paths = render_plots(recs, tmp_path)
    assert [p.name for p in paths] == [f"{n}.png" for n in PLOTS]
    for p in paths:
        assert np.var(imread(p)[..., :3]) > 1e-3


def test_a_missing_run_is_a_clear_error(tmp_path):
    from fleetlearn.ops import StoreError

    with pytest.raises(StoreError, match="no run found"):
        write_report(tmp_path / "nope")
