import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from headless_chromium import HeadlessChromium, find_chromium
from matplotlib.image import imread

from fleetlearn.monitoring import serve_dashboard
from fleetlearn.records import RoundRecord

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_the_json_endpoint_serves_the_run_store(guarded_run):
    s = guarded_run.summary
    with serve_dashboard(s.run_dir) as srv:
        assert srv.url.startswith("http://127.0.0.1:") and srv.port > 0
        status, ctype, body = get(srv.url + "api/rounds")
        assert status == 200 and ctype == "application/json"
        data = json.loads(body)  # strict JSON: NaN became null
        assert data["run"]["id"] == Path(s.run_dir).name and data["run"]["status"] == "finished"
        assert data["columns"]["round"] == [r.round for r in s.records]
        assert data["columns"]["accuracy"] == [r.accuracy for r in s.records]
        assert data["columns"]["uplink_bytes"] == [r.uplink_bytes for r in s.records]
        assert [e["round"] for e in data["events"]["rollbacks"]] == [4, 5]
        assert {a["detector"] for a in data["events"]["alerts"]} >= {"divergence"}
        ok_versions = [v["version"] for v in data["versions"] if v["status"] == "ok"]
        # Versions only go up; the two rolled-back models' numbers are never reused.
        assert len(ok_versions) == 10 and ok_versions == sorted(set(ok_versions)) and ok_versions[-1] == 12
        status, ctype, page = get(srv.url)
        assert status == 200 and ctype.startswith("text/html") and b'data-ready="0"' in page
        external = page.replace(b"http://www.w3.org/2000/svg", b"")  # the SVG namespace is a name, not a fetch
        assert b"http://" not in external and b"https://" not in external and b"<script src" not in external
        assert get(srv.url + "nope")[0] == 404 and get(srv.url + "healthz")[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url + "healthz", timeout=2)


def test_a_live_source_is_read_on_every_poll():
    records = [RoundRecord(round=1, version=1, accuracy=0.5)]
    with serve_dashboard(lambda: records) as srv:
        assert json.loads(get(srv.url + "api/rounds")[2])["columns"]["round"] == [1]
        records.append(RoundRecord(round=2, version=2, accuracy=0.6))
        data = json.loads(get(srv.url + "api/rounds")[2])
        assert data["columns"]["accuracy"] == [0.5, 0.6] and data["run"]["status"] == "live"


def test_a_bad_source_is_refused(tmp_path):
    from fleetlearn.ops import StoreError

    with pytest.raises(StoreError):
        serve_dashboard(tmp_path)
    with pytest.raises(TypeError, match="dashboard source"):
        serve_dashboard(42)


def test_dashboard_in_headless_chromium(guarded_run):
    binary = find_chromium()
    if binary is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        print("SKIPPED:", reason)
        pytest.skip(reason)
    s = guarded_run.summary
    live = [RoundRecord(round=1, version=1, accuracy=0.3, loss=2.0), RoundRecord(round=2, version=2, accuracy=0.4, loss=1.8)]
    with serve_dashboard(s.run_dir) as srv, serve_dashboard(lambda: live, poll_ms=200) as live_srv, HeadlessChromium(binary) as browser:
        browser.open(srv.url)
        browser.wait_for("document.body.dataset.ready === '1'")
        assert browser.evaluate("document.body.dataset.rounds") == str(len(s.records))
        charts = browser.evaluate(
            "Array.from(document.querySelectorAll('svg.chart')).map(svg => ({id: svg.dataset.chart,"
            " lines: Array.from(svg.querySelectorAll('polyline')).map(p => p.getAttribute('points').trim().split(/\\s+/).length),"
            " rollbacks: svg.querySelectorAll('rect.rollback').length, alerts: svg.querySelectorAll('line.alert').length}))"
        )
        assert [c["id"] for c in charts] == ["accuracy", "loss", "bytes", "participation", "latency", "updates"]
        for c in charts:
            assert c["lines"] and max(c["lines"]) >= 10, c  # curves with a point per round
            assert c["rollbacks"] == 2 and c["alerts"] >= 2, c
        header = browser.evaluate("document.querySelector('header').innerText")
        assert "finished" in header and Path(s.run_dir).name in header
        assert browser.evaluate("document.getElementById('versions').innerText").count("rolled_back") == 2
        assert "divergence" in browser.evaluate("document.getElementById('alerts').innerText")
        shot = browser.screenshot(ARTIFACTS / "dashboard.png")
        # A live source: the page polls and redraws when a round arrives.
        browser.send("Page.navigate", {"url": live_srv.url})
        browser.wait_for("document.body.dataset.ready === '1' && document.body.dataset.rounds === '2'")
        live.append(RoundRecord(round=3, version=3, accuracy=0.5, loss=1.5))
        browser.wait_for("document.body.dataset.rounds === '3'")
        assert browser.errors() == []
    img = imread(shot)
    assert img.shape[:2] == (900, 1200) and float(np.var(img[..., :3])) > 1e-3
    print("dashboard screenshot:", shot)
