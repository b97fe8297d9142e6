"""The report against the results store it is drawn from.

The store's content is the report's input, so these tests write store records
themselves (through ``core.store.append``, the same call the pipeline uses) for the
registry's paper configurations, then check that every chart returns, and every table
cell holds, what the records and models.toml say — recomputed here from the records,
by the formulas the paper uses (e.g. mAP@0.5 per MParam = map50 * 100 / (params / 1e6)).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from core import store

CHROMIUM = Path("/usr/bin/chromium")


def _net_key(spec) -> str:
    # Configurations that are the same network at another input size share family and source.
    return spec.family + json.dumps(dict(spec.source), sort_keys=True)


def _params(spec) -> int:
    return 5_000_000 + int(hashlib.sha256(_net_key(spec).encode()).hexdigest()[:6], 16) * 4


def _macs(spec) -> int:
    return 120 * _params(spec) // 1000 * spec.height * spec.width // 1000


def _contract(spec, weights: str) -> dict[str, str]:
    return {"detbench.name": spec.name, "detbench.family": spec.family, "detbench.framework": spec.framework,
            "detbench.input_height": str(spec.height), "detbench.input_width": str(spec.width),
            "detbench.weights": weights, "detbench.source_params": str(_params(spec) + 17)}


def _write_model(root: Path, spec, *, trained: bool, p50: float, map50: float | None = None, providers=("cpu",),
                 nodes=None, sha: str | None = None) -> str:
    sha = sha or hashlib.sha256(f"{spec.name}-{trained}-{p50}".encode()).hexdigest()
    c = _contract(spec, "sha256:" + "ab" * 32 if trained else "random-init")
    store.append("export", {"seconds": 1.0, "path": f"{spec.name}.onnx", "file_bytes": 1000, "random_init": not trained,
                            "validation": {}}, model=spec.name, model_sha256=sha, contract=c, root=root)
    macs = _macs(spec)
    store.append("profile", {"mode": "static", "macs": macs, "conv_macs": macs - 1000, "flops": 2 * macs,
                             "params": _params(spec), "folded_norm_constants": 0, "postprocess_macs": 1000,
                             "by_op": {}, "unknown_ops": []}, model=spec.name, model_sha256=sha, contract=c, root=root)
    for i, provider in enumerate(providers):
        lat = p50 / (1 + 3 * i)
        store.append("bench", {"latency_ms": {"mean": lat + 1, "std": 0.5, "p50": lat, "p90": lat + 2, "p99": lat + 3,
                                              "min": lat - 1}, "throughput_ips": 1000 / (lat + 1), "session_seconds": 0.1,
                               "peak_rss_mb": 10.0, "runs": 5, "warmup": 1, "batch": 1,
                               "providers_ran": [provider.upper() + "ExecutionProvider"], "machine_peak_gflops": None,
                               "fraction_of_peak": None, "native": None, "nodes": nodes},
                     model=spec.name, model_sha256=sha, provider=provider, contract=c, root=root,
                     settings={"batch": 1})
    if map50 is not None:
        store.append("eval", {"stats": {}, "map50": map50, "map": map50 / 2, "images_evaluated": 144,
                              "images_skipped": [], "annotations_sha256": "cd" * 32, "wall_seconds": 1.0,
                              "session_seconds": 0.9, "backend": "pycocotools", "resize": spec.resize},
                     model=spec.name, model_sha256=sha, provider="cpu", contract=c, root=root)
    return sha


NODES = {"by_op": {"Conv": {"us": 8000.0, "share": 0.8}, "MaxPool": {"us": 1500.0, "share": 0.15},
                   "NonMaxSuppression": {"us": 500.0, "share": 0.05}}, "total_us": 10000.0}


@pytest.fixture(scope="module")
def paper(registry):
    specs = [s for s in registry if s.paper]
    assert len(specs) == 11, "the paper has eleven configurations"
    return specs


@pytest.fixture(scope="module")
def results(tmp_path_factory, paper):
    """A store with every paper configuration except the last one measured: the first trained
    (eval record), the rest random-init; one random-init model also has a (meaningless) eval
    record that the report must ignore; one bench skipped provider in the manifest."""
    from core.manifest import Manifest

    root = tmp_path_factory.mktemp("report-store")
    measured = paper[:-1]
    for i, spec in enumerate(measured):
        _write_model(root, spec, trained=(i == 0), p50=20.0 + 37.0 * i, map50=0.305 if i == 0 else None,
                     providers=("cpu", "cuda") if i < 2 else ("cpu",), nodes=NODES if i < 3 else None)
    random_spec = measured[1]
    sha = [r for r in store.load("export", random_spec.name, root=root).records][-1]["model_sha256"]
    c = _contract(random_spec, "random-init")
    store.append("eval", {"stats": {}, "map50": 0.001, "map": 0.0, "images_evaluated": 8, "images_skipped": [],
                          "annotations_sha256": "cd" * 32, "wall_seconds": 1, "session_seconds": 1,
                          "backend": "pycocotools", "resize": "letterbox"},
                 model=random_spec.name, model_sha256=sha, provider="cpu", contract=c, root=root)
    m = Manifest(root)
    for spec in measured:
        m.put(spec.name, spec.input_size, "bench", "tensorrt", key="k", status="skipped",
              reason="TensorrtExecutionProvider cannot load here")
    return root


@pytest.fixture(scope="module")
def built(results, tmp_path_factory):
    from report import build_report

    return build_report(tmp_path_factory.mktemp("report-out"), root=results)


def _latest(root, kind, model, provider=None):
    recs = [r for r in store.load(kind, model, root=root).records if provider is None or r["provider"] == provider]
    return recs[-1] if recs else None


def _expected_map50(root, spec):
    """(percent, status) straight from the records and models.toml."""
    exp = _latest(root, "export", spec.name)
    ev = _latest(root, "eval", spec.name)
    if exp is not None and ev is not None and exp["contract"]["detbench.weights"] != "random-init" \
            and ev["model_sha256"] == exp["model_sha256"]:
        return ev["data"]["map50"] * 100, "measured"
    pub = spec.published.get("map50")
    return (pub.value, "published") if pub else (None, None)


def test_every_paper_configuration_is_a_row(built, paper):
    labels = [r.label for r in built.rows]
    for spec in paper:
        assert spec.name in labels
    unmeasured = next(r for r in built.rows if r.name == paper[-1].name)
    assert unmeasured.weights is None and unmeasured.gops is None
    assert "not run here yet" in unmeasured.skipped["run"]


def test_scatter_returns_what_the_store_says(built, results, paper):
    data = {d["label"]: d for d in built.chart_data["map50_per_mparam_vs_gops"]}
    for spec in paper:
        prof = _latest(results, "profile", spec.name)
        m50, status = _expected_map50(results, spec)
        if prof is None or m50 is None:
            assert spec.name not in data
            continue
        d = data[spec.name]
        assert d["gops"] == pytest.approx(2 * prof["data"]["macs"] / 1e9, rel=1e-12)
        assert d["mparams"] == pytest.approx(prof["data"]["params"] / 1e6, rel=1e-12)
        assert d["map50_per_mparam"] == pytest.approx(m50 / (prof["data"]["params"] / 1e6), rel=1e-12)
        assert d["status"] == status
    assert any(d["status"] == "measured" for d in data.values())
    assert any(d["status"] == "published" for d in data.values())


def test_bar_charts_return_what_the_store_says(built, results, paper):
    per_net = {d["label"]: d for d in built.chart_data["map50_per_network"]}
    per_mp = {d["label"]: d["value"] for d in built.chart_data["map50_per_mparam_per_network"]}
    per_gops = {d["label"]: d["value"] for d in built.chart_data["map50_per_gops_per_network"]}
    for spec in paper:
        m50, status = _expected_map50(results, spec)
        if m50 is None:
            assert spec.name not in per_net
            continue
        assert per_net[spec.name]["value"] == pytest.approx(m50) and per_net[spec.name]["status"] == status
        prof = _latest(results, "profile", spec.name)
        if prof is None:
            assert spec.name not in per_mp and spec.name not in per_gops
            continue
        assert per_mp[spec.name] == pytest.approx(m50 / (prof["data"]["params"] / 1e6))
        assert per_gops[spec.name] == pytest.approx(m50 / (2 * prof["data"]["macs"] / 1e9))


def test_random_init_eval_is_never_shown_as_measured(built, paper):
    row = next(r for r in built.rows if r.name == paper[1].name)
    assert row.random_init is True
    pub = paper[1].published.get("map50")
    assert (row.map50 is None) if pub is None else (row.map50.status == "published" and row.map50.value == pub.value)
    assert row.map50 is None or row.map50.value != pytest.approx(0.1)


def test_trained_row_is_measured_with_its_source(built, paper):
    row = next(r for r in built.rows if r.name == paper[0].name)
    assert row.map50.status == "measured" and row.map50.value == pytest.approx(30.5)
    assert row.map.value == pytest.approx(15.25)
    assert "144 COCO val2017 images" in row.map50.source


def test_pareto_front_worked_by_hand():
    from report.charts import pareto_front

    pts = [{"n": "a", "x": 10, "y": 30}, {"n": "b", "x": 20, "y": 25}, {"n": "c", "x": 30, "y": 40},
           {"n": "d", "x": 40, "y": 35}, {"n": "e", "x": 50, "y": 50}, {"n": "f", "x": 50, "y": 45},
           {"n": "g", "x": 60, "y": 50}]
    assert [p["n"] for p in pareto_front(pts, "x", "y")] == ["a", "c", "e"]


def test_accuracy_vs_latency_per_provider(built, results, paper):
    data = built.chart_data["accuracy_vs_latency"]
    assert set(data) == {"cpu", "cuda"}  # tensorrt was skipped everywhere: no panel, no fake point
    from report.charts import pareto_front

    for provider, panel in data.items():
        for p in panel["points"]:
            spec = next(s for s in paper if s.name == p["label"])
            bench = _latest(results, "bench", spec.name, provider)
            assert p["latency_ms"] == bench["data"]["latency_ms"]["p50"]
            assert (p["map50"], p["status"]) == pytest.approx(_expected_map50(results, spec))
        expected = pareto_front([{"l": p["label"], "x": p["latency_ms"], "y": p["map50"]} for p in panel["points"]],
                                "x", "y")
        assert panel["pareto"] == [p["l"] for p in expected]
    assert len(data["cuda"]["points"]) == 2


def test_input_size_scaling_groups_same_network(built, results, paper):
    groups = built.chart_data["input_size_scaling"]
    measured = paper[:-1]
    by_net: dict[str, list] = {}
    for spec in measured:
        by_net.setdefault(_net_key(spec), []).append(spec)
    expected = [sorted(v, key=lambda s: s.height * s.width) for v in by_net.values() if len(v) >= 2]
    assert expected, "the registry's paper list has a network at several input sizes (e.g. YOLOv3 320/416/608)"
    assert sorted(tuple(p["label"] for p in g["points"]) for g in groups) == \
        sorted(tuple(s.name for s in g) for g in expected)
    for g in groups:
        for p in g["points"]:
            prof = _latest(results, "profile", p["label"])
            bench = _latest(results, "bench", p["label"], "cpu")
            assert p["gops"] == pytest.approx(2 * prof["data"]["macs"] / 1e9)
            assert p["latency_ms"]["cpu"] == bench["data"]["latency_ms"]["p50"]
        gops = [p["gops"] for p in g["points"]]
        assert gops == sorted(gops)


def test_time_per_op_type_from_node_profiles(built, paper):
    data = built.chart_data["time_per_op_type"]
    assert set(data) == {"cpu", "cuda"}
    assert set(data["cpu"]) == {s.name for s in paper[:3]}
    assert data["cpu"][paper[0].name] == {"Conv": 8.0, "MaxPool": 1.5, "NonMaxSuppression": 0.5}


def test_newer_export_replaces_older_measurements(tmp_path, registry):
    from report.collect import collect

    spec = next(s for s in registry if s.paper)
    _write_model(tmp_path, spec, trained=True, p50=100.0, map50=0.4)
    sha2 = _write_model(tmp_path, spec, trained=False, p50=50.0)
    row = next(r for r in collect(root=tmp_path, registry=registry) if r.name == spec.name)
    assert row.onnx_sha256 == sha2 and row.random_init
    assert row.latency["cpu"].p50_ms == 50.0
    assert row.map50 is None or row.map50.status == "published"  # the trained file's eval no longer applies


def test_csv_matches_rows(built, results, paper):
    from report.table import CONV_GOPS_COLUMN, GOPS_COLUMN

    with open(built.csv, newline="", encoding="utf-8") as fh:
        lines = list(csv.DictReader(fh))
    assert [ln["network"] for ln in lines][:11] == [s.name for s in paper]
    for ln, spec in zip(lines, paper):
        prof = _latest(results, "profile", spec.name)
        m50, status = _expected_map50(results, spec)
        if prof is not None:
            assert float(ln[GOPS_COLUMN]) == pytest.approx(2 * prof["data"]["macs"] / 1e9, rel=1e-12)
            assert float(ln[CONV_GOPS_COLUMN]) == pytest.approx(2 * prof["data"]["conv_macs"] / 1e9, rel=1e-12)
            assert float(ln["MParams"]) == pytest.approx(prof["data"]["params"] / 1e6, rel=1e-12)
            assert float(ln["p50 latency cpu (ms)"]) == _latest(results, "bench", spec.name, "cpu")["data"]["latency_ms"]["p50"]
            assert "tensorrt" in ln["not measured (reasons)"]
        else:
            assert ln[GOPS_COLUMN] == "" and ln["p50 latency cpu (ms)"] == ""
        if m50 is None:
            assert ln["mAP@0.5 (%)"] == ""
        else:
            assert float(ln["mAP@0.5 (%)"]) == pytest.approx(m50) and ln["mAP@0.5 status"] == status
            src = ln["mAP@0.5 source"]
            if status == "published":
                assert src == spec.published["map50"].source
            else:
                assert src.startswith("measured here: 144 COCO val2017 images")
        assert ln["paper"] == "yes"
    assert lines[0]["host"].startswith(store.host_info()["hostname"] + " (")
    assert "onnx" in json.loads(lines[0]["versions"])


def test_markdown_marks_published_and_lists_sources(built, paper):
    md = built.markdown.read_text()
    for spec in paper:
        pub = spec.published.get("map50")
        if pub is not None and spec != paper[0]:
            assert f"{pub.value:.1f} published [" in md
            assert pub.source in md
    assert "30.5 measured [" in md
    assert "provider tensorrt (every model): skipped: TensorrtExecutionProvider cannot load here" in md
    assert "Host and versions" in md


def test_html_is_self_contained_with_every_chart(built):
    page = built.html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(built.charts)
    for encoded, path in zip(images, built.charts.values()):
        assert base64.b64decode(encoded) == path.read_bytes()
    assert "<table>" in page and page.count("<tr>") == len(built.rows) + 1


def test_pngs_are_real_images(built):
    import matplotlib.image as mpimg

    for path in built.charts.values():
        img = mpimg.imread(path)
        assert img.shape[0] >= 400 and img.shape[1] >= 800
        assert img[..., :3].std() > 0.05  # not a blank canvas


def _chromium(page: Path, tmp: Path) -> tuple[str, str]:
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (Debian package `chromium`, /usr/bin/chromium)")
def test_html_opens_in_headless_chromium_without_console_errors(built, tmp_path):
    dom, log = _chromium(built.html, tmp_path)
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-charts-decoded="{len(built.charts)}"' in body and f'data-charts-total="{len(built.charts)}"' in body


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (Debian package `chromium`, /usr/bin/chromium)")
def test_chromium_check_catches_a_broken_chart(built, tmp_path):
    """The browser check above can fail: a page with a corrupt chart is caught."""
    broken = tmp_path / "broken.html"
    page = built.html.read_text()
    broken.write_text(page.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAAR', 1))
    dom, log = _chromium(broken, tmp_path)
    assert any(":CONSOLE" in ln and "chart did not decode" in ln for ln in log.splitlines())
    assert f'data-charts-decoded="{len(built.charts) - 1}"' in dom


def test_report_cli_writes_the_folder(results, tmp_path, paper):
    import os
    import sys

    out = tmp_path / "rep"
    env = {**os.environ, "DETBENCH_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, "cli.py", "report", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} >= {"table.csv", "table.md", "report.html", "map50_per_network.png"}
    text = " ".join(proc.stdout.split())
    assert "m = measured here, p = published (models.toml)" in text
    first = next(ln for ln in proc.stdout.splitlines() if ln.startswith(paper[0].name))
    assert "30.5 m" in first and "15.2 m" in first
    shutil.rmtree(out)


def test_largest_evaluation_of_the_file_wins(tmp_path, registry):
    """A later --quick evaluation over a few images does not replace a full one of the same file."""
    from report.collect import collect

    spec = next(s for s in registry if s.paper)
    sha = _write_model(tmp_path, spec, trained=True, p50=10.0, map50=0.4)
    c = _contract(spec, "sha256:" + "ab" * 32)
    store.append("eval", {"stats": {}, "map50": 0.2, "map": 0.1, "images_evaluated": 8, "images_skipped": [],
                          "annotations_sha256": "cd" * 32, "wall_seconds": 1, "session_seconds": 1,
                          "backend": "pycocotools", "resize": spec.resize},
                 model=spec.name, model_sha256=sha, provider="cpu", contract=c, root=tmp_path)
    row = next(r for r in collect(root=tmp_path, registry=registry) if r.name == spec.name)
    assert (row.map50.value, row.eval_images) == (pytest.approx(40.0), 144)


def test_incomplete_profile_is_flagged(tmp_path, registry):
    from report.collect import collect

    spec = next(s for s in registry if s.paper)
    sha = _write_model(tmp_path, spec, trained=False, p50=10.0)
    store.append("profile", {"mode": "static", "macs": 10, "conv_macs": 5, "flops": 20, "params": 3,
                             "folded_norm_constants": 0, "postprocess_macs": 0, "by_op": {},
                             "unknown_ops": ["MyOp"], "unresolved_nodes": ["n1", "n2"]},
                 model=spec.name, model_sha256=sha, contract=_contract(spec, "random-init"), root=tmp_path)
    row = next(r for r in collect(root=tmp_path, registry=registry) if r.name == spec.name)
    assert row.gops == pytest.approx(2e-8)
    assert row.skipped["profile"].startswith("incomplete count (lower bound): uncounted op types ['MyOp'], 2 node(s)")
