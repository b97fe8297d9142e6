"""Bad input, tried the way a new user would: every command answers with its exit code and a
message that names the file, entry or option, never a traceback (issue 12, rules 1, 3, 4, 6, 7).

Each rule has the issue's own case and at least one more. Commands run through typer's
CliRunner, so what is asserted is what a user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from rich.console import Console
from typer.testing import CliRunner

import cli
from core.contract import IR_VERSION, check_io, read_contract, save_model
from core.errors import ConfigError, ContractError, DatasetError, ModelDefinitionError, WeightsError
from test_contract import contract, toy_model

ANN = "coco-val2017-subset/annotations/instances_val2017.json"


@pytest.fixture(autouse=True)
def plain_consoles(monkeypatch):
    # Wide, colourless consoles: assertions see whole lines as the user reads them.
    monkeypatch.setattr(cli, "console", Console(width=400, force_terminal=False, color_system=None))
    monkeypatch.setattr(cli, "err_console", Console(width=400, force_terminal=False, color_system=None, stderr=True))


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    # A traceback means bad input reached code that did not expect it.
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError,
                                                                                  AttributeError, KeyError,
                                                                                  ValueError, IndexError,
                                                                                  StopIteration)), result.output
    return result


def darknet_registry(tmp_path: Path, monkeypatch, cfg_text: str) -> None:
    """A models.toml with one Darknet model whose cfg (no pinned sha256) is in an isolated cache folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "toy.cfg").write_text(cfg_text)
    (tmp_path / "models.toml").write_text(
        '[models."toy-tiny"]\nfamily = "yolov3"\nframework = "darknet"\ninput_size = [416, 416]\n'
        'resize = "letterbox"\nlabel_space = "coco80"\nscore_threshold = 0.005\niou_threshold = 0.45\n'
        'max_detections = 100\nsource = { cfg = "toy.cfg" }\nweights = { format = "darknet" }\n')
    monkeypatch.setenv("DETBENCH_MODELS", str(tmp_path / "models.toml"))
    monkeypatch.setenv("DETBENCH_CACHE", str(cache))


def tiny_cfg(darknet_dir: Path) -> str:
    return (darknet_dir / "yolov3-tiny.cfg").read_text()


def save_foreign(model, path: Path) -> Path:
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(path))
    return path


# --------------------------------------------------------------------------- 1. never markup


def test_weights_under_a_bracketed_folder_export_and_print_the_path(tmp_path, darknet_dir):
    folder = tmp_path / "a[/b]"
    folder.mkdir(parents=True)  # "a[" holding "b]": the folder
    (folder / "yolov3-tiny.weights").symlink_to(darknet_dir / "yolov3-tiny.weights")
    out = tmp_path / "out[red]" / "tiny.onnx"
    result = invoke("export", "yolov3-tiny", "--weights", folder / "yolov3-tiny.weights", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.output and out.is_file()


def test_profile_of_a_file_in_a_bracketed_folder(tmp_path):
    path = save_model(toy_model(), tmp_path / "a[/b]" / "[bold]toy.onnx", contract())
    result = invoke("profile", path, "--no-onnx-tool", "--no-store")
    assert result.exit_code == 0, result.output
    assert str(path) in result.output


def test_unknown_cfg_section_is_named_with_its_brackets(tmp_path, monkeypatch, darknet_dir):
    darknet_registry(tmp_path, monkeypatch, tiny_cfg(darknet_dir).replace("[maxpool]", "[foo]", 1))
    result = invoke("export", "toy-tiny", "--out", tmp_path / "out")
    assert result.exit_code == ModelDefinitionError.exit_code, result.output
    assert "unsupported layer type [foo]; this exporter implements [convolutional], [maxpool]," in result.output


def test_error_text_with_brackets_reaches_the_user_verbatim(tmp_path, coco_dir):
    # The message of a results entry quotes the user's data: "[1, 2, 3]" and "[bold]" must survive.
    results = tmp_path / "[bold]dets.json"
    results.write_text(json.dumps([{"image_id": 139, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]))
    result = invoke("eval", "--results", results, "--annotations", coco_dir / "annotations/instances_val2017.json")
    assert result.exit_code == DatasetError.exit_code
    assert str(results) in result.output
    assert "entry 0: bbox [1, 2, 3] is 3 values, not a list of 4 numbers" in result.output


# --------------------------------------------------------------------------- 3. one contract check


def test_bench_refuses_a_graph_whose_input_is_not_images(tmp_path):
    path = save_foreign(toy_model(input_name="input_0"), tmp_path / "foreign.onnx")
    result = invoke("bench", path, "--runs", "1", "--warmup", "0", "--no-peak")
    assert result.exit_code == ContractError.exit_code, result.output
    assert "inputs are ['input_0'], the contract wants exactly ['images']" in result.output
    # eval says the same thing through the same check
    evaluated = invoke("eval", path, "--annotations", tmp_path / "unused.json")
    assert evaluated.exit_code == ContractError.exit_code
    assert "inputs are ['input_0'], the contract wants exactly ['images']" in evaluated.output


def test_bench_without_metadata_suggests_only_options_that_exist(tmp_path):
    path = save_foreign(toy_model(), tmp_path / "bare.onnx")
    result = invoke("bench", path, "--runs", "1", "--warmup", "0", "--no-peak")
    assert result.exit_code == ContractError.exit_code, result.output
    assert "lacks detbench metadata keys" in result.output
    # every option named comes with the command that has it; bench has none of them
    assert "export --onnx FILE --describe FILE.toml" in result.output
    before, _, after = result.output.partition("--input-size")
    assert before.rstrip().endswith("eval FILE") and "--resize" in after
    bench_help = invoke("bench", "--help").output
    assert all(option not in bench_help for option in ("--input-size", "--resize", "--label-space", "--describe"))


def test_read_contract_checks_outputs_and_takes_the_commands_hint(tmp_path):
    model = toy_model(output_names=("dets", "scores", "labels"))
    for key, value in contract().to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    assert check_io(model, "m")  # complete metadata, wrong outputs
    with pytest.raises(ContractError, match=r"outputs are \['dets', 'scores', 'labels'\]"):
        read_contract(save_foreign(model, tmp_path / "dets.onnx"))
    with pytest.raises(ContractError, match="lacks detbench metadata keys.*use --describe X"):
        read_contract(save_foreign(toy_model(), tmp_path / "bare.onnx"), hint="use --describe X")


@pytest.mark.parametrize("command", ["bench", "profile", "eval"])
def test_a_directory_or_an_empty_file_is_named_for_what_it_is(tmp_path, command):
    extra = {"bench": ["--runs", "1", "--no-peak"], "profile": ["--no-store"], "eval": ["--annotations", "x.json"]}
    result = invoke(command, tmp_path, *extra[command])
    assert result.exit_code == ContractError.exit_code, result.output
    assert f"{tmp_path} is a directory, not an ONNX file" in result.output
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    result = invoke(command, empty, *extra[command])
    assert result.exit_code == ContractError.exit_code, result.output
    assert "is empty (0 bytes)" in result.output


# --------------------------------------------------------------------------- other commands, bad paths


def test_output_paths_that_cannot_be_used_are_errors_not_tracebacks(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    result = invoke("report", "--out", taken)
    assert result.exit_code == ConfigError.exit_code and str(taken) in result.output
    model = save_model(toy_model(), tmp_path / "toy.onnx", contract())
    result = invoke("profile", model, "--csv", tmp_path, "--no-store", "--no-onnx-tool")
    assert result.exit_code == ConfigError.exit_code
    assert f"--csv {tmp_path} is a directory" in result.output


def test_weights_option_that_is_a_directory_or_missing(tmp_path):
    result = invoke("export", "yolov3-tiny", "--weights", tmp_path)
    assert result.exit_code == WeightsError.exit_code
    assert f"--weights {tmp_path} is a directory, not a weights file" in result.output
    result = invoke("export", "yolov3-tiny", "--weights", tmp_path / "absent.weights")
    assert result.exit_code == WeightsError.exit_code and "no such file" in result.output


# --------------------------------------------------------------------------- 6. structure warnings


def test_a_cfg_without_its_last_yolo_section_exports_with_a_warning(tmp_path, monkeypatch, darknet_dir):
    text = tiny_cfg(darknet_dir)
    darknet_registry(tmp_path, monkeypatch, text[:text.rindex("[yolo]")])
    result = invoke("export", "toy-tiny", "--out", tmp_path / "cut.onnx")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.output
    assert "layer 22 [convolutional]" in warnings[0] and "feeds no other layer and no detection head" in warnings[0]
    assert "anchors [0, 1, 2] of the 6" in warnings[1]
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "cut.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props["detbench.structure_warnings"]) == [w.removeprefix("warning: ") for w in warnings]


# --------------------------------------------------------------------------- 7. interrupting eval


def test_ctrl_c_during_eval_says_how_to_resume(tmp_path, monkeypatch):
    import eval.coco

    def interrupted(path, *settings, progress, **options):
        class Report:
            done, resumed, total, wall_seconds, skipped = 7, 0, 144, 1.0, 0

        progress(Report())
        raise KeyboardInterrupt

    monkeypatch.setattr(eval.coco, "evaluate_model", interrupted)
    model = tmp_path / "m[1].onnx"
    result = invoke("eval", model, "--coco", tmp_path / "coco", "--limit", "50")
    assert result.exit_code == 130
    assert "interrupted after 7 image(s)" in result.output
    assert f"python cli.py eval '{model}' --coco {tmp_path / 'coco'} --limit 50 --resume" in result.output


# --------------------------------------------------------------------------- 7. one cache, one run


def test_a_detection_cache_in_use_is_refused_not_interleaved(tmp_path):
    from eval.image_feed import DetectionCache

    path = tmp_path / "shared.cache.jsonl"
    first = DetectionCache(path, {"model": "a"}).open(resume=False)
    first.add(1, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}], 0.01)
    for resume in (False, True):  # neither a fresh start (which would truncate) nor a resume may proceed
        with pytest.raises(ConfigError) as err:
            DetectionCache(path, {"model": "a"}).open(resume=resume)
        assert f"detection cache {path} is in use by another evaluation" in str(err.value)
        assert "--cache FILE" in str(err.value)
    first.add(2, [], 0.02)
    first.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("image_id") for line in lines] == [None, 1, 2]  # header, then both images

    # once released, the next run resumes it
    second = DetectionCache(path, {"model": "a"}).open(resume=True)
    assert sorted(second.done) == [1, 2]
    second.close()


def test_the_cache_lock_holds_across_processes(tmp_path):
    """Own case: the issue's two `eval` runs are two processes; the lock is the file's, not the object's."""
    import subprocess
    import sys

    from eval.image_feed import DetectionCache

    path = tmp_path / "c.jsonl"
    holder = DetectionCache(path, {"model": "a"}).open(resume=False)
    try:
        code = ("import sys; from pathlib import Path; from eval.image_feed import DetectionCache\n"
                "from core.errors import ConfigError\n"
                "try:\n    DetectionCache(Path(sys.argv[1]), {'model': 'a'}).open(resume=True)\n"
                "except ConfigError as exc:\n    print(exc); sys.exit(3)\n")
        other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                               cwd=str(Path(cli.__file__).parent))
    finally:
        holder.close()
    assert other.returncode == 3, other.stderr
    assert "is in use by another evaluation" in other.stdout


def test_profile_of_a_graph_without_an_input_is_a_contract_error(tmp_path):
    from onnx import TensorProto, helper

    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "no-input", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[const])
    path = save_foreign(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "c.onnx")
    result = invoke("profile", path, "--no-onnx-tool", "--no-store")
    assert result.exit_code == ContractError.exit_code
    assert "has no input" in result.output and str(path) in result.output
