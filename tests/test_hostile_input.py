"""Bad and hostile input, round three (issue 24): names that would become paths outside the
results folder, numbers that never end a loop, a store whose last line was cut, files detbench
wrote itself that another command could not use, disk errors, a CI guard that compared nothing.

Every rule has the issue's cases and at least one more. Commands run through typer's CliRunner
(what a user sees) or, where a hang is the risk, in a child process with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from core import store
from core.contract import read_contract, save_model
from core.errors import ConfigError, ContractError, ExportError, RegistryError, WriteError
from core.names import NAME_PATTERN, file_in, name_problem
from test_bad_input import invoke, plain_consoles, save_foreign  # noqa: F401 (plain_consoles: autouse fixture)
from test_contract import contract, toy_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "exporters" / "foreign" / "describe_examples"
RAW_HEADS = (EXAMPLES / "yolo_raw_heads.toml").read_text()


def _describe(tmp_path: Path, text: str, name: str = "d") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` in a child process; a hang fails the test after ``timeout`` s."""
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "300", **(env or {})})


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> Path:
    return save_model(toy_model(), tmp_path_factory.mktemp("toy") / "toy.onnx", contract())


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory, darknet_dir) -> Path:
    """yolov3-tiny (official weights) cut at its two raw YOLO heads: a foreign ONNX detector."""
    from test_onnx_wrap import _darknet, build_raw_heads

    _, full, heads, _ = _darknet(darknet_dir)
    path = tmp_path_factory.mktemp("heads") / "heads.onnx"
    onnx.save(build_raw_heads(full, heads), path)
    return path


# --------------------------------------------------------------------------- 1. names never become paths


ESCAPING_NAMES = ["../../escaped", "/abs/path", "sub/dir/x", "<script>alert(1)</script>", "..", "a..b",
                  "x" * 129, "back\\slash", "nul\x00byte", "-leading-dash", "ｙolo"]


@pytest.mark.parametrize("name", ESCAPING_NAMES, ids=range(len(ESCAPING_NAMES)))
def test_describe_name_outside_the_character_set_is_refused_before_anything_is_written(name, tmp_path, toy_file):
    work = tmp_path / "a" / "b"
    out = work / "results" / "onnx"
    text = RAW_HEADS.replace('name = "yolov3-tiny-heads"', f"name = {json.dumps(name)}")
    describe = _describe(tmp_path, text)
    result = invoke("export", "--onnx", toy_file, "--describe", describe, "--out", out)
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"--describe {describe}: name:" in result.output and NAME_PATTERN in result.output
    # nothing anywhere under the test's folder but the describe file itself
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [Path("d.toml")]


def test_a_name_in_the_character_set_is_kept_as_given(tmp_path):
    from exporters.foreign.describe import read_description

    name = "My_det.v2+q@x-1"
    desc = read_description(_describe(tmp_path, RAW_HEADS.replace('name = "yolov3-tiny-heads"', f'name = "{name}"')))
    assert desc.name == name and file_in(tmp_path, desc.name) == tmp_path / f"{name}.onnx"


def test_file_in_keeps_every_derived_file_inside_its_folder(tmp_path):
    assert file_in(tmp_path, "yolov3-tiny", "-320x320.onnx") == tmp_path / "yolov3-tiny-320x320.onnx"
    assert file_in(tmp_path, "ssd300@int8") == tmp_path / "ssd300@int8.onnx"
    for name in ESCAPING_NAMES:
        assert name_problem(name) is not None, name
        with pytest.raises(ConfigError, match="name"):
            file_in(tmp_path, name)
    # a suffix that would leave the folder is caught by the containment check, not the character set
    with pytest.raises(ConfigError, match="outside"):
        file_in(tmp_path, "ok", "/../../x.onnx")


def _registry(tmp_path: Path, monkeypatch, *names: str) -> Path:
    entry = ('family = "yolov3"\nframework = "darknet"\ninput_size = [416, 416]\nresize = "letterbox"\n'
             'label_space = "coco80"\nscore_threshold = 0.005\niou_threshold = 0.45\nmax_detections = 100\n'
             'source = { cfg = "yolov3-tiny.cfg" }\nweights = { format = "darknet" }\n')
    path = tmp_path / "models.toml"
    path.write_text("".join(f"[models.{json.dumps(n)}]\n{entry}\n" for n in names))
    monkeypatch.setenv("DETBENCH_MODELS", str(path))
    return path


def test_models_toml_entry_outside_the_character_set_is_refused(tmp_path, monkeypatch):
    path = _registry(tmp_path, monkeypatch, "../../evilreg")
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "deep" / "er" / "results"))
    for args in (["export", "../../evilreg", "--random-init"], ["list"]):
        result = invoke(*args)
        assert result.exit_code == RegistryError.exit_code, result.output
        assert f"{path}: [models.../../evilreg]: name '../../evilreg' holds '/'" in result.output
    assert not any(p.suffix == ".onnx" for p in tmp_path.rglob("*"))


def test_models_differing_only_in_case_are_refused(tmp_path, monkeypatch):
    path = _registry(tmp_path, monkeypatch, "Tiny", "tiny")
    result = invoke("list")
    assert result.exit_code == RegistryError.exit_code, result.output
    assert f"{path}: models 'Tiny' and 'tiny' differ only in case" in result.output


def test_model_name_on_the_command_line_is_checked_against_the_rule(tmp_path, monkeypatch):
    _registry(tmp_path, monkeypatch, "tiny")
    result = invoke("export", "../tiny", "--random-init")
    assert result.exit_code == RegistryError.exit_code and "model name given: name '../tiny' holds '/'" in result.output


@pytest.mark.parametrize("key,value,message", [
    ("detbench.name", "../../x", "name '../../x' holds '/'"),
    ("detbench.score_threshold", "nan", "score_threshold nan is not a number in 0..1")])
def test_an_onnx_file_whose_metadata_names_a_path_or_a_nan_is_refused(key, value, message, tmp_path):
    # The name in a file's metadata becomes file names too (NAME@int8, the native runner's weights).
    model = toy_model()
    for k, v in {**contract().to_props(), key: value}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    path = save_foreign(model, tmp_path / "hostile.onnx")
    for command in (["bench", path, "--runs", "1", "--warmup", "0", "--no-peak"], ["profile", path, "--no-store", "--no-onnx-tool"],
                    ["quantize", path, "--images", "1"]):
        result = invoke(*command)
        assert result.exit_code == ContractError.exit_code, result.output
        assert f"{path}: {message}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.onnx"]


def test_table_md_escapes_what_report_html_escapes(tmp_path, registry, monkeypatch):
    import report as report_module
    from report import build_report
    from test_report import _write_model

    hostile = "<script>alert(1)</script>|*x*"
    spec = next(s for s in registry if s.paper)
    _write_model(tmp_path, spec, trained=False, p50=10.0, name=hostile)  # an old store, from before names were checked
    monkeypatch.setattr(report_module, "CHARTS", [])  # the tables are what is checked; charts take seconds
    result = build_report(tmp_path / "report", root=tmp_path)
    md = result.markdown.read_text()
    html = result.html.read_text()
    assert "<script>alert" not in md and "<script>alert" not in html  # report.html has a script of its own
    assert "&lt;script>alert(1)&lt;/script>\\|\\*x\\*" in md  # as typed once rendered: no tag, no emphasis, no cell break
    MarkdownIt = pytest.importorskip("markdown_it", reason="markdown-it-py renders the table as a reader sees it").MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(md)
    assert "<script>alert" not in rendered and "&lt;script&gt;alert(1)&lt;/script&gt;|*x*" in rendered


# --------------------------------------------------------------------------- 2. numbers finite and in range


def test_bench_seconds_that_would_never_end_are_refused(toy_file):
    # NaN in a child process with a timeout: `clock() >= end` is never true, so a regression hangs
    proc = _cli("bench", toy_file, "--seconds", "nan", "--warmup", "0", "--no-peak", timeout=120)
    assert proc.returncode == ConfigError.exit_code, proc.stdout + proc.stderr
    assert "--seconds nan: must be a positive finite number of seconds" in proc.stderr
    assert "Traceback" not in proc.stderr
    for seconds in ("inf", "-1", "0"):
        result = invoke("bench", toy_file, "--seconds", seconds, "--warmup", "0", "--no-peak")
        assert result.exit_code == ConfigError.exit_code, result.output
        assert f"--seconds {float(seconds)}: must be a positive finite number of seconds" in result.output


def test_run_bench_seconds_inf_is_refused_before_any_step(tmp_path, monkeypatch):
    # (nan is refused by the option's own minimum; inf passes it)
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    result = invoke("run", "--models", "yolov3-tiny", "--bench-seconds", "inf", "--no-report")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "--bench-seconds inf: must be a positive finite number of seconds" in result.output
    assert not (tmp_path / "results").exists()


def test_thread_counts_above_what_the_machine_can_use_are_refused_with_the_reason(toy_file):
    from runtime.backends.base import THREADS_PER_CPU, usable_cpus

    cap = THREADS_PER_CPU * usable_cpus()
    proc = _cli("bench", toy_file, "--threads", "9999", "--runs", "1", "--warmup", "0", "--no-peak", timeout=120)
    assert proc.returncode == ConfigError.exit_code, proc.stdout + proc.stderr
    assert f"--threads 9999: this machine lets detbench use {usable_cpus()} CPU(s)" in proc.stderr
    assert f"Give at most {cap}" in proc.stderr
    # the same rule for eval's decode workers, and the cap itself is accepted
    result = invoke("eval", toy_file, "--annotations", "x.json", "--workers", str(cap + 1))
    assert result.exit_code == ConfigError.exit_code and f"--workers {cap + 1}:" in result.output
    result = invoke("bench", toy_file, "--threads", str(cap), "--runs", "1", "--warmup", "0", "--no-peak")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("key,value,where", [
    ("score_threshold", "nan", "score_threshold"), ("score_threshold", "inf", "score_threshold"),
    ("scale", "inf", "input.scale"), ("scale", "nan", "input.scale"), ("iou_threshold", "nan", "iou_threshold"),
    ("pad_value", "-inf", "pad_value"), ("score_threshold", "1.5", "score_threshold")])
def test_describe_numbers_that_are_not_finite_or_in_range_are_refused(key, value, where, tmp_path, toy_file):
    if key == "scale":
        text = RAW_HEADS.replace("scale = 0.00392156862745098", f"scale = {value}")
    elif key == "pad_value":
        text = RAW_HEADS.replace("max_detections = 100", f"max_detections = 100\npad_value = {value}")
    else:
        text = RAW_HEADS.replace(f"{key} = ", f"{key} = {value}\n_old_{key} = ", 1)
        text = "\n".join(line for line in text.splitlines() if not line.startswith("_old_"))
    describe = _describe(tmp_path, text)
    result = invoke("export", "--onnx", toy_file, "--describe", describe, "--out", tmp_path / "out")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"--describe {describe}: {where}:" in result.output
    assert not (tmp_path / "out").exists()


def test_models_toml_threshold_nan_is_refused(tmp_path, monkeypatch):
    path = _registry(tmp_path, monkeypatch, "tiny")
    path.write_text(path.read_text().replace("score_threshold = 0.005", "score_threshold = nan"))
    result = invoke("list")
    assert result.exit_code == RegistryError.exit_code
    assert f"{path}: model 'tiny': score_threshold must be a number in 0..1, got nan" in result.output


def test_wrapping_a_model_that_detects_nothing_is_not_validated(tmp_path, heads_file):
    # Every score is below 0.999 on the validation images: both sides return nothing.
    text = RAW_HEADS.replace("score_threshold = 0.005", "score_threshold = 0.999")
    result = invoke("export", "--onnx", heads_file, "--describe", _describe(tmp_path, text), "--out", tmp_path / "o")
    assert result.exit_code == ExportError.exit_code, result.output
    assert "no detection on any of the 3 validation image(s) on either side: nothing was compared" in result.output
    assert "score_threshold 0.999" in result.output and not (tmp_path / "o").exists()


def test_parity_of_two_empty_outputs_is_not_an_agreement():
    from runtime.parity import NOTHING_COMPARED, check_parity

    class Empty:
        path = None

        def __init__(self, name):
            self.info = type("Info", (), {"backend": name, "precision": "f32", "detail": {}})()

        def run(self, tensor):
            return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                    "labels": np.zeros(0, np.int64)}

    import runtime.parity as parity_module

    original = parity_module.read_contract
    parity_module.read_contract = lambda _path: contract()
    try:
        result = check_parity(Empty("openvino"), Empty("cpu"), [Path("a.jpg"), Path("b.jpg")],
                              tensors=[np.zeros((1, 3, 4, 6), np.float32)] * 2)
    finally:
        parity_module.read_contract = original
    assert result.verdict == NOTHING_COMPARED and not result.agrees
    assert result.reasons == ["no detection on either side on any of the 2 image(s) (a.jpg, b.jpg): nothing was "
                              "compared"]


# --------------------------------------------------------------------------- 3. the store never loses a record


def _bench_record(root: Path, model: str = "toy", sha: str = "a" * 64, provider: str = "cpu"):
    samples = [10.0 + 0.01 * i for i in range(20)]
    return store.append("bench", {"samples_ms": samples, "latency_ms": {"p50": 10.1}, "batch": 1},
                        model=model, model_sha256=sha, provider=provider, root=root,
                        contract={"detbench.input_height": "4", "detbench.input_width": "6"})


def test_an_append_after_a_cut_line_starts_on_a_fresh_line(tmp_path):
    _bench_record(tmp_path)
    path = store.store_path(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 2])  # a second record cut halfway (power loss)
    _bench_record(tmp_path, sha="b" * 64)
    loaded = store.load(root=tmp_path)
    assert [r["model_sha256"] for r in loaded.records] == ["a" * 64, "b" * 64]
    assert loaded.corrupt_lines == [2]
    assert loaded.skipped_note() == (f"{path}: 1 line(s) that are not records (cut short, not JSON, or not an object "
                                     "with a known kind and data) were skipped (line 2)")


NOT_RECORDS = ["[1, 2, 3]", '"text"', "42", "null", '{"kind": "bench"}', '{"kind": "nope", "data": {}}',
               '{"kind": "eval", "data": [1]}', "{not json", "\udcff\udcfe garbage"]


def _append_bad_lines(root: Path) -> None:
    with open(store.store_path(root), "a", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write("\n".join(NOT_RECORDS) + "\n")


def _store_with_bad_lines(root: Path) -> Path:
    _bench_record(root)
    _append_bad_lines(root)
    _bench_record(root, sha="b" * 64, provider="openvino")
    return store.store_path(root)


def test_compare_skips_counts_and_names_lines_that_are_not_records(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _store_with_bad_lines(a)
    _store_with_bad_lines(b)
    assert store.load(root=a).corrupt_lines == list(range(2, 2 + len(NOT_RECORDS)))
    compared = invoke("compare", a, b)
    assert compared.exit_code == 0, compared.output
    assert f"{len(NOT_RECORDS)} line(s) that are not records were skipped" in compared.output
    # a store copied under another name is read by the same reader
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(store.store_path(b).read_bytes())
    compared = invoke("compare", a, copy)
    assert compared.exit_code == 0 and f"B ({copy}): {len(NOT_RECORDS)} line(s)" in compared.output


def test_report_skips_counts_and_names_lines_that_are_not_records(tmp_path, monkeypatch, registry):
    from test_report import _write_model

    spec = next(s for s in registry if s.paper)
    _write_model(tmp_path, spec, trained=False, p50=10.0)  # export, profile, bench: lines 1-3
    _append_bad_lines(tmp_path)
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))
    import report as report_module

    monkeypatch.setattr(report_module, "CHARTS", [])  # the store's reading is what is checked; charts take seconds
    reported = invoke("report", "--out", tmp_path / "report")
    assert reported.exit_code == 0, reported.output
    bad = ", ".join(str(n) for n in range(4, 4 + len(NOT_RECORDS)))
    assert f"warning: {store.store_path(tmp_path)}: {len(NOT_RECORDS)} line(s) that are not records" in reported.output
    assert f"(line {bad})" in reported.output
    assert "10.0" in (tmp_path / "report" / "table.md").read_text()  # the records around them still count


def test_run_skip_logic_reads_past_lines_that_are_not_records(tmp_path, monkeypatch):
    from pipeline.run import RunSettings, _Pipeline

    _store_with_bad_lines(tmp_path)
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))
    pipeline = _Pipeline([], RunSettings(), None, None, None, False)
    assert pipeline.have == {("bench", "a" * 64, "cpu"), ("bench", "b" * 64, "openvino")}
    assert f"{len(NOT_RECORDS)} line(s) that are not records" in pipeline.summary.store_note


# --------------------------------------------------------------------------- 5. files detbench wrote are usable


@pytest.fixture(scope="module")
def produced(tmp_path_factory, exported, darknet_dir, heads_file):
    """The kinds of file detbench writes: registered export, its INT8 file, a wrapped foreign
    file, and a registered model at another input size."""
    from exporters.foreign.wrap import wrap_onnx
    from quantization.quantize import QuantizeSettings, quantize_model

    tmp = tmp_path_factory.mktemp("produced")
    registered = exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights").path
    int8 = quantize_model(registered, QuantizeSettings(images=1, method="minmax", out=tmp / "tiny@int8.onnx")).path
    wrapped = wrap_onnx(heads_file, EXAMPLES / "yolo_raw_heads.toml", tmp).path
    resized = exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights", input_size=(320, 320)).path
    return {"registered": registered, "int8": int8, "wrapped": wrapped, "resized": resized}


def test_a_wrapped_file_lists_each_opset_domain_once(produced):
    model = onnx.load(str(produced["wrapped"]), load_external_data=False)
    domains = [o.domain for o in model.opset_import]
    assert len(domains) == len(set(domains)) and domains.count("") == 1


@pytest.mark.parametrize("kind", ["registered", "int8", "wrapped", "resized"])
def test_every_command_runs_on_every_kind_of_file_detbench_writes(kind, produced, coco_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    path = produced[kind]
    name = read_contract(path).name
    assert invoke("profile", path, "--no-onnx-tool", "--no-store").exit_code == 0
    benched = invoke("bench", path, "--runs", "1", "--warmup", "0", "--no-peak")
    assert benched.exit_code == 0, benched.output
    evaluated = invoke("eval", path, "--coco", coco_dir, "--image-ids", "802")
    assert evaluated.exit_code == 0, evaluated.output
    quantized = invoke("quantize", path, "--images", "1", "--method", "minmax", "--out", tmp_path / "q.onnx")
    if kind == "int8":  # refused for what it is, not a traceback
        assert quantized.exit_code == ConfigError.exit_code and "is already quantized" in quantized.output
    else:
        assert quantized.exit_code == 0, quantized.output
        assert read_contract(tmp_path / "q.onnx").name == f"{name}@int8"


def test_label_map_shorter_than_the_class_count_names_the_file(tmp_path, heads_file):
    text = RAW_HEADS.replace("num_classes = 80", "num_classes = 80\nlabel_map = [1, 2, 3]")
    describe = _describe(tmp_path, text)
    result = invoke("export", "--onnx", heads_file, "--describe", describe, "--out", tmp_path / "o")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"--describe {describe}: outputs.label_map: has 3 entries for 80 classes" in result.output


def test_label_map_short_for_the_class_ids_a_detections_file_gives(tmp_path):
    # A file that already did NMS gives class ids; how many there can be is only seen at run time.
    from exporters.foreign.decode import map_labels
    from exporters.foreign.describe import read_description

    text = ('name = "d"\ninput_size = [4, 6]\nresize = "stretch"\nlabel_space = "coco91"\niou_threshold = 0.5\n'
            '[outputs]\nlayout = "detections"\nboxes = "b"\nscores = "s"\nlabels = "l"\nlabel_map = [1, 2, 3]\n')
    desc = read_description(_describe(tmp_path, text))
    assert map_labels(desc, np.array([0, 2])).tolist() == [1, 3]
    for ids, shown in (([0, 3], 3), ([-1, 0], -1)):  # numpy would fail on 3 and silently wrap -1 to the end
        with pytest.raises(ConfigError, match=rf"outputs.label_map: has 3 entries .* class id {shown}"):
            map_labels(desc, np.array(ids))


# --------------------------------------------------------------------------- 6. disk errors name the file


def test_export_beyond_the_file_size_limit_names_the_file_and_leaves_nothing(tmp_path, heads_file):
    out = tmp_path / "o" / "w.onnx"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "sys.argv = ['cli.py'] + sys.argv[1:]; import cli; cli.app()")
    proc = subprocess.run([sys.executable, "-c", code, "export", "--onnx", str(heads_file), "--describe",
                           str(EXAMPLES / "yolo_raw_heads.toml"), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == WriteError.exit_code == ExportError.exit_code, proc.stdout + proc.stderr
    assert f"cannot write {out}: File too large; nothing was written under that name" in proc.stderr
    assert "Traceback" not in proc.stderr and list(out.parent.iterdir()) == []


def test_writes_where_a_folder_cannot_be_made_name_the_file(tmp_path, heads_file):
    # A file where the output folder should be: refused whoever runs the test (root ignores modes).
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(WriteError, match=f"cannot write {blocker / 'x.onnx'}: "):
        save_model(toy_model(), blocker / "x.onnx", contract())
    result = invoke("export", "--onnx", heads_file, "--describe", EXAMPLES / "yolo_raw_heads.toml",
                    "--out", blocker / "w.onnx")
    assert result.exit_code == WriteError.exit_code, result.output
    assert f"cannot write {blocker / 'w.onnx'}: " in result.output
    with pytest.raises(WriteError, match="the record was not stored"):
        store.append("bench", {}, root=blocker / "sub")
    from core.files import write_text_atomic

    with pytest.raises(WriteError, match=f"cannot write {blocker / 'r.json'}"):
        write_text_atomic(blocker / "r.json", "{}")
    assert blocker.read_text() == "a file"


# --------------------------------------------------------------------------- 7. compare fails closed


def test_compare_of_stores_with_nothing_in_common_fails_closed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _bench_record(a, model="alpha")
    _bench_record(b, model="beta")
    result = invoke("compare", a, b)
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "have no (model, backend, precision, input size) in common: nothing was compared" in result.output
    assert "A has alpha 4x6 f32 on cpu; B has beta 4x6 f32 on cpu" in result.output
    allowed = invoke("compare", a, b, "--allow-nothing-in-common")
    assert allowed.exit_code == 0, allowed.output


def test_compare_thresholds_that_are_not_finite_are_refused(tmp_path):
    _bench_record(tmp_path / "a")
    result = invoke("compare", tmp_path / "a", tmp_path / "a", "--max-map-drop", "nan")
    assert result.exit_code == ConfigError.exit_code and "--max-map-drop must be 0 or more" in result.output


# --------------------------------------------------------------------------- 8. smaller


def test_report_out_pointing_at_a_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    taken = tmp_path / "report.html"
    taken.write_text("not a folder")
    result = invoke("report", "--out", taken)
    assert result.exit_code == ConfigError.exit_code
    assert f"--out {taken} is a file, not a folder" in result.output and "File exists" not in result.output
    assert taken.read_text() == "not a folder"


def test_parity_with_nothing_to_match_is_not_an_agreement():
    """Detections on both sides, but every one under the bf16 rule's score floor (random-init
    yolov2 on openvino-bf16 "agreed" 0/0 in a full run): nothing was compared."""
    from runtime.parity import NOTHING_COMPARED, check_parity

    class Low:
        path = None

        def __init__(self, name, precision):
            self.info = type("Info", (), {"backend": name, "precision": precision, "detail": {}})()

        def run(self, tensor):
            boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
            return {"boxes": boxes, "scores": np.array([0.12, 0.08], np.float32), "labels": np.array([1, 2], np.int64)}

    import runtime.parity as parity_module

    original = parity_module.read_contract
    parity_module.read_contract = lambda _p: contract()
    try:
        low = check_parity(Low("openvino-bf16", "bf16"), Low("cpu", "f32"), [Path("a.jpg")],
                           tensors=[np.zeros((1, 3, 4, 6), np.float32)])
        same = check_parity(Low("openvino", "f32"), Low("cpu", "f32"), [Path("a.jpg")],
                            tensors=[np.zeros((1, 3, 4, 6), np.float32)])
    finally:
        parity_module.read_contract = original
    assert low.verdict == NOTHING_COMPARED and not low.agrees and low.total == 0
    assert "nothing was compared" in low.reasons[0] and "2 reference detection(s)" in low.reasons[0]
    assert same.verdict == "agree" and same.total == 2  # float32: both detections had to match, and did
