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

# Debian names the binary `chromium`, Ubuntu and older images `chromium-browser`.
CHROMIUM = Path(shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium")


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


def _validity(verdict: str = "VALID", reason: str = "", n: int = 80) -> dict:
    """``latency_validity`` as runtime.stats.Latency.to_dict() writes it (the parts the report reads)."""
    v = {"verdict": verdict, "reason": reason}
    return {"n": n, "rsd": 0.02, "smoke": False, "valid": verdict == "VALID",
            "verdicts": {"mean": v, "p50": v, "p90": v, "p99": {"verdict": "INVALID", "reason": f"{n} runs < 662"}}}


def _bench(root, name, sha, c, provider, p50, *, parity="agree", precision="f32", verdict="VALID", reason="",
           ratio=None, nodes=None, host=None):
    rec = store.append("bench", {"latency_ms": {"mean": p50 + 1, "std": 0.5, "p50": p50, "p90": p50 + 2, "p99": p50 + 3,
                                                "min": p50 - 1}, "latency_validity": _validity(verdict, reason),
                                 "throughput_ips": 1000 / (p50 + 1), "session_seconds": 0.1, "peak_rss_mb": 10.0,
                                 "runs": 80, "warmup": 1, "batch": 1, "precision": precision,
                                 "backend": {"library": "x", "precision": precision},
                                 "parity": None if provider == "cpu" else {"verdict": parity, "matched": 9, "total": 10,
                                                                           "max_box_px": 0.5, "max_score": 0.02},
                                 "parity_verdict": "reference" if provider == "cpu" else parity, "ratio_to_cpu": ratio,
                                 "providers_ran": [provider.upper() + "ExecutionProvider"], "machine_peak_gflops": None,
                                 "fraction_of_peak": None, "native": None, "nodes": nodes},
                       model=name, model_sha256=sha, provider=provider, contract=c, root=root, settings={"batch": 1})
    if host is not None:  # another machine's record: the store stamps this one's host, so rewrite the line
        path = store.store_path(root)
        lines = path.read_text().splitlines()
        last = json.loads(lines[-1])
        last["host"] = {**last["host"], "hostname": host}
        path.write_text("\n".join(lines[:-1] + [json.dumps(last, sort_keys=True)]) + "\n")
    return rec


def _eval(root, name, sha, c, provider, map50, *, images=144, image_ids=None, map_=None):
    store.append("eval", {"stats": {}, "map50": map50, "map": map50 / 2 if map_ is None else map_,
                          "images_evaluated": images, "images_skipped": [], "annotations_sha256": "cd" * 32,
                          "wall_seconds": 1.0, "session_seconds": 0.9, "backend": "pycocotools", "resize": "letterbox"},
                 model=name, model_sha256=sha, provider=provider, contract=c, root=root,
                 settings={"image_ids": image_ids})


def _write_model(root: Path, spec, *, trained: bool, p50: float, map50: float | None = None, providers=("cpu",),
                 nodes=None, sha: str | None = None, name: str | None = None, size: tuple[int, int] | None = None,
                 contract_extra: dict | None = None, macs: int | None = None, by_op: dict | None = None,
                 weight_bytes: int | None = None) -> str:
    name = name or spec.name
    sha = sha or hashlib.sha256(f"{name}-{size}-{trained}-{p50}".encode()).hexdigest()
    c = _contract(spec, "sha256:" + "ab" * 32 if trained else "random-init")
    c["detbench.name"] = name
    if size is not None:
        c["detbench.input_height"], c["detbench.input_width"] = str(size[0]), str(size[1])
    c.update(contract_extra or {})
    store.append("export", {"seconds": 1.0, "path": f"{name}.onnx", "file_bytes": 1000, "random_init": not trained,
                            "validation": {}}, model=name, model_sha256=sha, contract=c, root=root)
    macs = _macs(spec) if macs is None else macs
    store.append("profile", {"mode": "static", "macs": macs, "conv_macs": macs - 1000, "flops": 2 * macs,
                             "params": _params(spec), "folded_norm_constants": 0, "postprocess_macs": 1000,
                             "by_op": by_op or {}, "unknown_ops": [], "weight_bytes": weight_bytes},
                 model=name, model_sha256=sha, contract=c, root=root)
    for i, provider in enumerate(providers):
        _bench(root, name, sha, c, provider, p50 / (1 + 3 * i), nodes=nodes)
    if map50 is not None:
        _eval(root, name, sha, c, "cpu", map50)
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
    assert "tensorrt" not in data["per_backend"]  # skipped everywhere: no fake point
    from report.charts import pareto_front

    for provider, panel in data["per_backend"].items():
        for p in panel["points"]:
            spec = next(s for s in paper if s.name == p["label"])
            bench = _latest(results, "bench", spec.name, provider)
            assert p["latency_ms"] == bench["data"]["latency_ms"]["p50"]
            # only an evaluation of that file on that very backend gives a point its accuracy
            ev = _latest(results, "eval", spec.name, provider)
            assert ev is not None and p["status"] == "measured"
            assert p["map50"] == pytest.approx(100.0 * ev["data"]["map50"])
        expected = pareto_front([{"l": p["label"], "x": p["latency_ms"], "y": p["map50"]} for p in panel["points"]
                                 if p["valid"]], "x", "y")
        assert panel["pareto"] == [p["l"] for p in expected]
    assert data["pareto"] == [p["id"] for p in pareto_front([p for p in data["points"] if p["valid"]],
                                                            "latency_ms", "map50")]
    for p in data["published"]:  # the published layer: marked, at the float cpu p50, never on the front
        assert p["status"] == "published" and p["id"] not in data["pareto"] and p["backend"] == "cpu"


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
    main = page[page.index('<table id="main-table">'):]
    main = main[:main.index("</table>")]
    assert main.count("<tr>") == len(built.rows) + 1


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


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (Debian package `chromium`; .ci/run installs it with apt-get)")
def test_html_opens_in_headless_chromium_without_console_errors(built, tmp_path):
    dom, log = _chromium(built.html, tmp_path)
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-charts-decoded="{len(built.charts)}"' in body and f'data-charts-total="{len(built.charts)}"' in body


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (Debian package `chromium`; .ci/run installs it with apt-get)")
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


# --------------------------------------------------------------------------- backends, precision, claims, hosts
# Synthetic stores whose expected figures are worked out by hand in each test.

def _specs(registry, count: int, published: bool = True):
    """``count`` distinct registry configurations (with a published mAP@0.5 when asked)."""
    return [s for s in registry if (s.published.get("map50") is not None) == published][:count]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def backends_store(tmp_path_factory, registry):
    """A: trained, cpu 100 ms (INVALID p50), openvino 95 ms (agrees, ratio 0.95 side by side),
    openvino-bf16 50 ms (DISAGREES, no own eval); B: trained, cpu 60 ms, openvino 70 ms (parity
    unchecked), openvino-bf16 30 ms (disagrees, but evaluated on bf16 itself: 28 %)."""
    root = tmp_path_factory.mktemp("backends")
    a, b = _specs(registry, 2)
    for spec, cpu, ev in ((a, 100.0, 0.40), (b, 60.0, 0.30)):
        sha, c = _sha(spec.name), _contract(spec, "sha256:" + "ab" * 32)
        store.append("export", {"file_bytes": 1}, model=spec.name, model_sha256=sha, contract=c, root=root)
        _bench(root, spec.name, sha, c, "cpu", cpu, verdict="INVALID" if spec is a else "VALID",
               reason="12 runs < 64 required" if spec is a else "")
        _eval(root, spec.name, sha, c, "cpu", ev)
    sa, ca = _sha(a.name), _contract(a, "sha256:" + "ab" * 32)
    _bench(root, a.name, sa, ca, "openvino", 95.0, parity="agree", ratio=0.95)
    _bench(root, a.name, sa, ca, "openvino-bf16", 50.0, parity="disagree", precision="bf16")
    sb, cb = _sha(b.name), _contract(b, "sha256:" + "ab" * 32)
    _bench(root, b.name, sb, cb, "openvino", 70.0, parity="unchecked")
    _bench(root, b.name, sb, cb, "openvino-bf16", 30.0, parity="disagree", precision="bf16")
    _eval(root, b.name, sb, cb, "openvino-bf16", 0.28)
    return root, a, b


def test_pareto_over_model_backend_pairs(backends_store, registry, tmp_path):
    from report.charts import accuracy_vs_latency
    from report.collect import collect

    root, a, b = backends_store
    rows = [r for r in collect(root=root, registry=registry) if r.latency]
    data = accuracy_vs_latency(rows, tmp_path / "acc.png")
    pts = {p["id"]: (p["latency_ms"], p["map50"], p["status"], p["precision"]) for p in data["points"]}
    assert pts == {f"{a.name} on cpu": (100.0, pytest.approx(40.0), "measured", "float32"),
                   f"{b.name} on cpu": (60.0, pytest.approx(30.0), "measured", "float32"),
                   f"{b.name} on openvino-bf16": (30.0, pytest.approx(28.0), "measured", "bf16")}
    # by hand: 30 ms/28 % and 60/30 are the VALID measured pairs; 100/40 has an INVALID p50 (off the front)
    assert data["pareto"] == [f"{b.name} on openvino-bf16", f"{b.name} on cpu"]
    basis = {p["id"]: p["basis"] for p in data["points"]}
    assert basis[f"{b.name} on openvino-bf16"] == "measured on openvino-bf16 (144 images)"
    left = " ".join(data["left_out"])
    # agreeing parity does not lend cpu's accuracy to openvino: not measured there
    assert f"{a.name} on openvino: not measured on openvino" in left
    assert f"{a.name} on openvino-bf16: not measured on openvino-bf16" in left
    assert f"{b.name} on openvino: not measured on openvino" in left
    assert not next(p for p in data["points"] if p["id"] == f"{a.name} on cpu")["valid"]


def test_disagreeing_backend_is_marked_and_ratios(backends_store, registry):
    from report.collect import collect
    from report.table import backend_cell_text, backend_latency, display_rows, markdown

    root, a, b = backends_store
    rows = [r for r in collect(root=root, registry=registry) if r.latency]
    data = backend_latency(rows)
    assert data["backends"] == ["cpu", "openvino", "openvino-bf16"]
    cells = {line["network"]: line["cells"] for line in data["rows"]}
    ov, bf = cells[a.name]["openvino"], cells[a.name]["openvino-bf16"]
    assert (ov["ratio"], ov["ratio_basis"]) == (0.95, "side by side")
    assert bf["ratio"] == pytest.approx(50.0 / 100.0) and bf["ratio_basis"] == "separate runs"
    assert "DISAGREES with cpu" in backend_cell_text(bf) and "[bf16]" in backend_cell_text(bf)
    assert "DISAGREES" not in backend_cell_text(ov)
    assert data["notes"] == ["12 runs < 64 required"]
    assert backend_cell_text(cells[a.name]["cpu"]).endswith("✗[1]")
    assert "parity unchecked" in backend_cell_text(cells[b.name]["openvino"])
    main, _ = display_rows(rows)
    row_a = next(c for c in main if c["network"].startswith(a.name))
    assert row_a["p50 latency openvino-bf16 (ms)"] == "50.0 (DISAGREES with cpu)"
    assert row_a["p50 latency cpu (ms)"] == "100.0 (INVALID)"
    assert row_a["p50 latency openvino (ms)"] == "95.0"
    md = markdown(rows)
    assert "## Latency per backend" in md and "1. 12 runs < 64 required" in md


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory, registry):
    """F trained: float cpu 100 / openvino 80 ms, int8 cpu 40 / openvino 20 ms; float eval over 144
    images (40 %) and over ids 1-3 (39.5 %), int8 eval over ids 1-3 (39 %). R random-init with a
    published mAP: float and int8 bench only."""
    root = tmp_path_factory.mktemp("int8")
    f, r = _specs(registry, 2)
    int8 = {"detbench.precision": "int8", "detbench.quantized_from": "x", "detbench.calibration_method": "minmax",
            "detbench.calibration_image_ids": json.dumps([7, 8])}
    sf = _write_model(root, f, trained=True, p50=100.0, map50=0.40, weight_bytes=4000)
    _bench(root, f.name, sf, _contract(f, "sha256:" + "ab" * 32), "openvino", 80.0)
    _eval(root, f.name, sf, _contract(f, "sha256:" + "ab" * 32), "cpu", 0.395, images=3, image_ids=[1, 2, 3])
    q = f"{f.name}@int8"
    sq = _write_model(root, f, trained=True, p50=40.0, name=q, contract_extra=int8, weight_bytes=1000)
    cq = {**_contract(f, "sha256:" + "ab" * 32), "detbench.name": q, **int8}
    _bench(root, q, sq, cq, "openvino", 20.0)
    _eval(root, q, sq, cq, "cpu", 0.39, images=3, image_ids=[1, 2, 3], map_=0.2)
    _write_model(root, r, trained=False, p50=50.0)
    _write_model(root, r, trained=False, p50=25.0, name=f"{r.name}@int8", contract_extra=int8)
    return root, f, r


def test_int8_table_worked_by_hand(int8_store, registry):
    from report.collect import collect
    from report.table import int8_markdown, int8_rows

    root, f, r = int8_store
    rows = collect(root=root, registry=registry)
    names = [x.name for x in rows]
    assert names.index(f"{f.name}@int8") == names.index(f.name) + 1  # the variant sits under its float model
    data = {(d["int8"], d["backend"]): d for d in int8_rows(rows)}
    cpu, ov = data[(f"{f.name}@int8", "cpu")], data[(f"{f.name}@int8", "openvino")]
    assert cpu["speedup"] == pytest.approx(100.0 / 40.0) and ov["speedup"] == pytest.approx(80.0 / 20.0)
    # the float file's evaluation on the int8 file's images (ids 1-3) is chosen over its 144-image one
    assert cpu["d_map50"] == pytest.approx(39.0 - 39.5) and cpu["d_map"] == pytest.approx(20.0 - 19.75)
    assert (cpu["images_float"], cpu["images_int8"], cpu["same_images"]) == (3, 3, True)
    assert ov["eval_backend"] == "cpu"
    assert (cpu["float_weight_bytes"], cpu["int8_weight_bytes"]) == (4000, 1000)
    assert cpu["float_gops"] == cpu["int8_gops"]  # quantization leaves the operations alone
    rnd = data[(f"{r.name}@int8", "cpu")]
    assert rnd["speedup"] == pytest.approx(2.0) and rnd["d_map50"] is None
    assert rnd["accuracy_note"] == "accuracy of random weights not measured"
    md = int8_markdown(rows)
    assert "2.50x" in md and "39.5 → 39.0 (-0.50)" in md and "accuracy of random weights not measured" in md


def test_int8_row_never_gets_published_accuracy(int8_store, registry):
    from report.collect import collect

    root, f, r = int8_store
    rows = {x.name: x for x in collect(root=root, registry=registry)}
    assert rows[r.name].map50.status == "published"  # the float model: published figure, as before
    q = rows[f"{r.name}@int8"]
    assert q.quantized and q.precision == "int8" and q.family == r.family and q.paper == r.paper
    assert q.map50 is None and q.map is None and q.published_gflops is None
    assert "accuracy of random weights not measured" in q.skipped["accuracy"]
    assert q.label == f"{r.name}@int8"
    assert rows[f"{f.name}@int8"].map50.value == pytest.approx(39.0)
    assert rows[f"{f.name}@int8"].calibration == "minmax on 2 COCO image(s)"


def _sizes_store(root, spec, map50s, macs=(1.0e9, 1.5e9, 2.0e9, 3.0e9), sizes=(320, 416, 512, 608)):
    for size, m, v in zip(sizes, macs, map50s):
        _write_model(root, spec, trained=True, p50=size / 10, map50=v, size=(size, size), macs=int(m))


@pytest.mark.parametrize("map50s, verdict", [((0.30, 0.33, 0.345, 0.35), "supported"),
                                             ((0.30, 0.31, 0.34, 0.35), "contradicted")])
def test_diminishing_returns_claim(tmp_path, registry, map50s, verdict):
    from report.charts import input_size_scaling
    from report.claims import diminishing_returns
    from report.collect import collect

    spec = next(s for s in registry if s.paper)
    _sizes_store(tmp_path, spec, map50s)
    rows = collect(root=tmp_path, registry=registry)
    data = diminishing_returns(rows, tmp_path / "a.png")
    assert data["verdict"] == verdict
    (series,) = data["families"][0]["measured"]
    assert [p["gops"] for p in series["points"]] == pytest.approx([2.0, 3.0, 4.0, 6.0])  # 2 x MACs / 1e9
    gains = [s["gain_per_gops"] for s in series["steps"]]
    m = [100 * v for v in map50s]
    assert gains == pytest.approx([(m[1] - m[0]) / 1, (m[2] - m[1]) / 1, (m[3] - m[2]) / 2])
    if verdict == "supported":  # 3.0, 1.5, 0.25 points per GOps
        assert "support the claim of diminishing returns" in data["text"] and "do not support" not in data["text"]
    else:  # 1.0, 3.0, 0.5: the gain grows at the second step
        assert "grows from +1.000 (320x320→416x416) to +3.000 (416x416→512x512)" in data["text"]
        assert "do not support the claim" in data["text"]
    scaling = next(g for g in input_size_scaling(rows, tmp_path / "s.png") if g["family"] == spec.family)
    assert [(p["label"], p["map50_status"]) for p in scaling["points"]][0] == (f"{spec.name} @320x320", "measured")


def _images(root, name, sha, c, network, post, latency, detections):
    store.append("images", {"images": [{"image": f"{i:012d}.jpg", "macs": n + p, "network_macs": n,
                                        "postprocess_macs": p, "detections": d, "latency_ms": t}
                                       for i, (n, p, t, d) in enumerate(zip(network, post, latency, detections))],
                            "n": len(network), "note": "synthetic"}, model=name, model_sha256=sha, provider="cpu",
                 contract=c, root=root)


@pytest.mark.parametrize("one_stage_varies", [False, True])
def test_per_image_claim(tmp_path, registry, one_stage_varies):
    from report.claims import per_image_cost
    from report.collect import collect

    one, two = _specs(registry, 2)
    so = _write_model(tmp_path, one, trained=True, p50=10.0, by_op={"Conv": {"macs": 1}})
    st = _write_model(tmp_path, two, trained=True, p50=30.0, by_op={"Conv": {"macs": 1}, "RoiAlign": {"macs": 0}})
    network = [4e9, 4e9 * 1.2, 4e9] if one_stage_varies else [4e9, 4e9, 4e9]
    _images(tmp_path, one.name, so, _contract(one, "x"), network, [1e6, 3e6, 2e6], [10.0, 11.0, 12.0], [1, 5, 3])
    _images(tmp_path, two.name, st, _contract(two, "x"), [10e9, 11e9, 12e9], [0, 0, 0], [30.0, 33.0, 36.0], [2, 4, 6])
    data = per_image_cost(collect(root=tmp_path, registry=registry), tmp_path / "b.png")
    m = {x["label"]: x for x in data["models"]}
    assert m[two.name]["stage"] == "two-stage" and m[one.name]["stage"] == "one-stage"
    g = m[two.name]["gops"]
    assert (g["min"], g["median"], g["max"]) == pytest.approx((20.0, 22.0, 24.0))
    assert g["spread"] == pytest.approx(4.0 / 22.0)
    assert m[two.name]["r_latency_detections"] == pytest.approx(1.0)
    assert "min 20.000 / median 22.000 / max 24.000 (spread 18.18 %" in data["text"]
    if one_stage_varies:
        assert data["verdict"] == "contradicted" and data["against"] == [one.name]
        assert "do not support the claim" in data["text"]
    else:
        assert m[one.name]["network_gops"]["spread"] == 0.0
        assert data["verdict"] == "supported" and "the measurements support the claim" in data["text"]


def test_hosts_validation_and_warnings_are_shown(tmp_path, registry):
    from report import build_report

    a, b = _specs(registry, 2)
    flagged = {"detbench.validation": "failed-accepted",
               "detbench.structure_warnings": json.dumps(["route layer 83 reads a layer after it"])}
    sa = _write_model(tmp_path, a, trained=False, p50=10.0, contract_extra=flagged)
    _bench(tmp_path, a.name, sa, {**_contract(a, "random-init"), **flagged}, "cpu", 9.0, host="node-2")
    _write_model(tmp_path, b, trained=False, p50=20.0)
    result = build_report(tmp_path / "out", root=tmp_path, registry=registry)
    row = next(r for r in result.rows if r.name == a.name)
    assert row.hosts == sorted({store.host_info()["hostname"], "node-2"})
    md, page = result.markdown.read_text(), result.html.read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| network"))
    assert "| host |" in header and "| export validation |" in header
    for text in (md, page):
        assert "failed-accepted" in text and "route layer 83 reads a layer after it" in text and "node-2" in text


def test_a_failed_side_by_side_bench_is_each_backends_failure(results, paper, tmp_path):
    """`run` benches several backends in one step named "cpu+openvino": its failure is reported per
    backend, and the joined name is never taken for a backend of its own."""
    import shutil

    from core.manifest import Manifest
    from report.collect import collect, provider_skips, providers

    root = tmp_path / "store"
    shutil.copytree(results, root)
    spec = paper[0]
    Manifest(root).put(spec.name, spec.input_size, "bench", "cpu+openvino", key="k", status="failed",
                       reason="unexpected KeyError: 'boxes'")
    rows = collect(root=root)
    row = next(r for r in rows if r.name == spec.name and r.input_size == spec.input_size)
    assert row.skipped["bench:cpu"] == row.skipped["bench:openvino"] == "failed: unexpected KeyError: 'boxes'"
    assert "cpu+openvino" not in providers(rows) and "cpu+openvino" not in provider_skips(rows)
    # a backend is a column only where it measured something; otherwise the footnote says why
    assert ("openvino" in providers(rows)) != ("openvino" in provider_skips(rows))


def test_published_accuracy_is_a_separate_layer_never_on_the_measured_front(tmp_path, registry):
    """A random-init float row with a published mAP, fast on cpu and on openvino-bf16: the published
    figure must not become a point (neither at cpu nor at bf16) and the front holds only measured pairs."""
    from report.charts import accuracy_vs_latency
    from report.collect import collect
    from report.table import table_rows

    root = tmp_path / "store"
    pub = next(s for s in registry if s.paper and s.published.get("map50") is not None)
    trained = next(s for s in registry if s.name != pub.name)
    sp = _write_model(root, pub, trained=False, p50=5.0)  # far faster than anything measured
    _bench(root, pub.name, sp, _contract(pub, "random-init"), "openvino-bf16", 3.0, precision="bf16")
    _write_model(root, trained, trained=True, p50=80.0, map50=0.30)
    rows = [r for r in collect(root=root, registry=registry) if r.latency]
    data = accuracy_vs_latency(rows, tmp_path / "acc.png")
    assert [p["id"] for p in data["points"]] == [f"{trained.name} on cpu"]
    assert data["pareto"] == [f"{trained.name} on cpu"]
    published = {p["id"]: p for p in data["published"]}
    assert list(published) == [f"{pub.name} (published)"]
    assert published[f"{pub.name} (published)"]["latency_ms"] == 5.0  # its float cpu p50, not the bf16 one
    assert published[f"{pub.name} (published)"]["map50"] == pytest.approx(float(pub.published["map50"].value))
    left = " ".join(data["left_out"])
    assert f"{pub.name} on openvino-bf16: not measured (random-init weights)" in left
    line = next(t for t in table_rows(rows) if t["network"].startswith(pub.name))
    assert line["mAP@0.5 status"] == "published" and line["mAP@0.5 measured per backend (%)"] is None
    line = next(t for t in table_rows(rows) if t["network"].startswith(trained.name))
    assert line["mAP@0.5 measured per backend (%)"] == "cpu 30.00 (144 images)"


def test_backends_that_ran_nowhere_are_no_column_but_one_footnote(tmp_path, registry):
    from core import manifest as run_manifest
    from report.collect import collect, provider_skips
    from report.table import backend_latency, columns, markdown

    root = tmp_path / "store"
    spec = next(iter(registry))
    _write_model(root, spec, trained=False, p50=20.0, providers=("cpu", "openvino"))
    m = run_manifest.Manifest(root)
    m.put(spec.name, spec.input_size, "bench", "cuda", key="", status="skipped", reason="no CUDA device here")
    m.save()
    rows = [r for r in collect(root=root, registry=registry) if r.latency]
    assert backend_latency(rows)["backends"] == ["cpu", "openvino"]
    assert not any("cuda" in c for c in columns(rows))
    assert provider_skips(rows) == {"cuda": "skipped: no CUDA device here"}
    md = markdown(rows)
    assert "cuda" not in md.split("Not measured, and why:")[0]  # no column before the footnote
    assert "- provider cuda (every model): skipped: no CUDA device here" in md


def test_a_schedule_reason_quoting_the_rule_is_said_once():
    """The scheduler's reason quotes the p50 rule's own (``budget spent ... (unstable: ...)``): the
    report's note must not repeat it (a full run printed every reason twice)."""
    from report.collect import _latency

    rule = "unstable: the 95 % confidence interval of the median spans +/-9.9 % > 5 % bound"
    rec = {"provider": "cpu", "data": {
        "latency_ms": {"p50": 10.0, "mean": 10.0, "std": 1.0}, "runs": 11,
        "latency_validity": {"n": 11, "verdicts": {"p50": {"verdict": "INVALID", "reason": rule}}},
        "schedule": {"p50_valid": False, "reason": f"budget spent before its p50 was VALID ({rule})"}}}
    assert _latency(rec).verdict_reason == f"budget spent before its p50 was VALID ({rule})"
    rec["data"]["schedule"]["reason"] = "too slow for the budget: 3 of 11 runs"
    assert _latency(rec).verdict_reason == f"too slow for the budget: 3 of 11 runs ({rule})"
