"""evaluate_model end to end on a tiny real ONNX detector and a synthetic COCO set.

The expected detections are worked out by hand from the drawn rectangles (see
tests/eval_fixtures.py): the model finds the bright rectangle in the resized tensor,
so mapped back to the image its box must lie within about one tensor pixel of the
drawn one, and carry the category of the rectangle's colour.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from eval.coco import STAT_NAMES, evaluate_model
from eval.image_feed import prefetched
from eval_fixtures import CHANNEL_TO_COCO91, SYNTHETIC_IMAGES, bright_box_detector, synthetic_coco
from core.errors import ConfigError, ContractError, DatasetError

H, W = 96, 128  # the detector's input tensor (non-square, to catch swapped axes)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_coco(tmp_path_factory.mktemp("synthetic-coco"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bright-box")
    return {
        (resize, space): bright_box_detector(root / f"{resize}-{space}.onnx", height=H, width=W, resize=resize,
                                             label_space=space)
        for resize in ("letterbox", "stretch") for space in ("coco80", "coco91")
    }


def _by_image(results_file: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for det in json.loads(Path(results_file).read_text()):
        out.setdefault(det["image_id"], []).append(det)
    return out


@pytest.mark.parametrize("space", ["coco80", "coco91"])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_detections_come_back_in_image_pixels_with_coco_ids(models, synth, tmp_path, resize, space):
    result = evaluate_model(models[(resize, space)], coco_dir=synth, results_file=tmp_path / "r.json",
                            cache_file=tmp_path / "c.jsonl", store=False)
    dets = _by_image(result.results_file)
    for image_id, w, h, rect, channel in SYNTHETIC_IMAGES:
        if rect is None:
            assert image_id not in dets  # an empty detection list is a valid result
            continue
        if resize == "letterbox":
            sx = sy = min(W / w, H / h)
        else:
            sx, sy = W / w, H / h
        (det,) = dets[image_id]
        x, y, bw, bh = det["bbox"]
        x1, y1, x2, y2 = rect
        # bilinear edges cross the threshold within one tensor pixel of the true edge
        for got, want, scale in ((x, x1, sx), (y, y1, sy), (x + bw, x2, sx), (y + bh, y2, sy)):
            assert abs(got - want) <= 1.0 / scale + 0.5, (image_id, det["bbox"], rect)
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-9 and y + bh <= h + 1e-9  # clipped to the image
        assert det["category_id"] == CHANNEL_TO_COCO91[channel]
        assert det["score"] == pytest.approx(0.9)
    assert result.scores["map50"] == 1.0  # every box overlaps its ground truth by far more than IoU 0.5
    assert result.images_evaluated == len(SYNTHETIC_IMAGES) and result.images_skipped == []
    assert result.detections == sum(1 for entry in SYNTHETIC_IMAGES if entry[3] is not None)


def test_outputs_with_a_batch_axis_give_the_same_results(synth, tmp_path, models):
    batched = bright_box_detector(tmp_path / "batched.onnx", height=H, width=W, batch_outputs=True)
    a = evaluate_model(batched, coco_dir=synth, results_file=tmp_path / "a.json", cache_file=tmp_path / "a.jsonl",
                       store=False)
    b = evaluate_model(models[("letterbox", "coco80")], coco_dir=synth, results_file=tmp_path / "b.json",
                       cache_file=tmp_path / "b.jsonl", store=False)
    assert json.loads(Path(a.results_file).read_text()) == json.loads(Path(b.results_file).read_text())


def test_bad_images_are_named_counted_and_the_run_goes_on(synth, tmp_path, models):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(synth, damaged)
    names = {entry[0]: f"{entry[0]:012d}.png" for entry in SYNTHETIC_IMAGES}
    (damaged / "val2017" / names[2]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")   # corrupt
    (damaged / "val2017" / names[5]).unlink()                                        # missing
    shutil.copy(synth / "val2017" / names[1], damaged / "val2017" / names[7])        # wrong size for its entry
    seen = []
    result = evaluate_model(models[("letterbox", "coco80")], coco_dir=damaged, results_file=tmp_path / "r.json",
                            cache_file=tmp_path / "c.jsonl", progress=seen.append, store=False)
    skipped = {s["file_name"]: s["reason"] for s in result.images_skipped}
    assert set(skipped) == {names[2], names[5], names[7]}
    assert "does not decode" in skipped[names[2]] and "not found" in skipped[names[5]]
    assert "decodes to 640x480, the annotations say 333x250" in skipped[names[7]]
    assert result.images_evaluated == len(SYNTHETIC_IMAGES) - 3 and result.images_selected == len(SYNTHETIC_IMAGES)
    assert seen[-1].done == len(SYNTHETIC_IMAGES) and seen[-1].skipped == 3
    # the skipped images are left out of the scoring, so the remaining ones still score perfectly
    assert result.scores["images"] == len(SYNTHETIC_IMAGES) - 3 and result.scores["map50"] == 1.0


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_uninterrupted_numbers(synth, tmp_path, models):
    model = models[("stretch", "coco80")]
    full = evaluate_model(model, coco_dir=synth, results_file=tmp_path / "full.json",
                          cache_file=tmp_path / "full.jsonl", store=False)

    def stop_after_three(p):
        if p.done == 3:
            raise Interrupted

    cache = tmp_path / "interrupted.jsonl"
    with pytest.raises(Interrupted):
        evaluate_model(model, coco_dir=synth, results_file=tmp_path / "part.json", cache_file=cache,
                       progress=stop_after_three, store=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 1 + 3  # header + the three finished images, each on disk
    # a kill in the middle of a write leaves a torn last line: it must be dropped, not break the resume
    with open(cache, "a") as fh:
        fh.write('{"image_id": 4, "detections": [{"image_')
    seen = []
    resumed = evaluate_model(model, coco_dir=synth, results_file=tmp_path / "part.json", cache_file=cache,
                             resume=True, progress=seen.append, store=False)
    assert resumed.images_resumed == 3 and seen[0].done == 3 and seen[-1].done == len(SYNTHETIC_IMAGES)
    ids = [json.loads(line)["image_id"] for line in cache.read_text().splitlines()[1:]]
    assert sorted(ids) == sorted(entry[0] for entry in SYNTHETIC_IMAGES)  # nothing repeated, nothing lost
    assert resumed.scores["stats"] == full.scores["stats"]
    assert json.loads(Path(resumed.results_file).read_text()) == json.loads(Path(full.results_file).read_text())
    # resuming a finished run runs nothing and gives the same numbers again
    again = evaluate_model(model, coco_dir=synth, results_file=tmp_path / "part.json", cache_file=cache,
                           resume=True, store=False)
    assert again.images_resumed == len(SYNTHETIC_IMAGES) and again.session_seconds == 0.0
    assert again.scores["stats"] == full.scores["stats"]


def test_a_killed_process_resumes_through_the_cli_to_the_same_numbers(synth, tmp_path, models):
    """A process SIGKILLed by its own progress callback after 3 images, then `cli.py eval --resume`."""
    import os
    import subprocess
    import sys

    model = models[("letterbox", "coco80")]
    cache, out = tmp_path / "killed.jsonl", tmp_path / "killed.json"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = (
        "import os, signal, sys\n"
        "from eval.coco import evaluate_model\n"
        "def kill(p):\n"
        "    if p.done == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"evaluate_model({str(model)!r}, coco_dir={str(synth)!r}, cache_file={str(cache)!r}, "
        f"results_file={str(out)!r}, progress=kill, store=False)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and len(cache.read_text().splitlines()) == 1 + 3
    cmd = [sys.executable, str(root / "cli.py"), "eval", str(model), "--coco", str(synth), "--cache", str(cache),
           "--out", str(out), "--resume"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 from the cache of an earlier run" in done.stdout
    full = evaluate_model(model, coco_dir=synth, results_file=tmp_path / "full.json",
                          cache_file=tmp_path / "full.jsonl", store=False)
    assert json.loads(out.read_text()) == json.loads(Path(full.results_file).read_text())
    ids = [json.loads(line)["image_id"] for line in cache.read_text().splitlines()[1:]]
    assert sorted(ids) == sorted(entry[0] for entry in SYNTHETIC_IMAGES)


def test_resume_refuses_a_cache_from_another_model(synth, tmp_path, models):
    cache = tmp_path / "c.jsonl"
    evaluate_model(models[("letterbox", "coco80")], coco_dir=synth, cache_file=cache, results_file=tmp_path / "a.json",
                   store=False, limit=2)
    with pytest.raises(ConfigError, match="different evaluation \\(differs in: .*model_sha256"):
        evaluate_model(models[("letterbox", "coco91")], coco_dir=synth, cache_file=cache,
                       results_file=tmp_path / "b.json", resume=True, store=False)


def test_model_without_metadata_says_what_to_pass(synth, tmp_path):
    bare = bright_box_detector(tmp_path / "bare.onnx", height=H, width=W, metadata=False)
    with pytest.raises(ContractError) as err:
        evaluate_model(bare, coco_dir=synth, store=False)
    message = str(err.value)
    for key in ("detbench.input_height", "detbench.input_width", "detbench.resize", "detbench.label_space",
                "--input-size HxW", "--resize letterbox|stretch", "--label-space coco80|coco91", str(bare)):
        assert key in message
    with pytest.raises(ContractError, match="lacks the detbench metadata evaluation needs: detbench.label_space"):
        evaluate_model(bare, coco_dir=synth, store=False,
                       overrides={"input_height": H, "input_width": W, "resize": "stretch"})
    described = evaluate_model(bare, coco_dir=synth, results_file=tmp_path / "r.json", cache_file=tmp_path / "c.jsonl",
                               overrides={"input_height": H, "input_width": W, "resize": "stretch",
                                          "label_space": "coco80"})
    assert described.scores["map50"] == 1.0
    assert described.contract["detbench.weights"] == "unknown" and described.contract["detbench.name"] == "bare"


def test_labels_outside_the_label_space_are_a_contract_error(synth, tmp_path, models):
    # the coco91 model read as coco80 is fine for ids < 80, but read the other way a coco80
    # model's label 0 (person) is background in coco91: that must not pass silently
    with pytest.raises(ContractError, match="emitted label 0 on 000000000001.png, which is not in its label space 'coco91'"):
        evaluate_model(models[("letterbox", "coco80")], coco_dir=synth, overrides={"label_space": "coco91"},
                       cache_file=tmp_path / "c.jsonl", results_file=tmp_path / "r.json", store=False)


def test_a_graph_that_is_not_a_detector_is_refused(tmp_path, synth):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with pytest.raises(ContractError, match="inputs are \\['x'\\], the contract wants exactly \\['images'\\]"):
        evaluate_model(path, coco_dir=synth, store=False)
    with pytest.raises(ContractError, match="no ONNX file at"):
        evaluate_model(tmp_path / "absent.onnx", coco_dir=synth, store=False)


def test_the_store_gets_an_eval_record(synth, tmp_path, models):
    from core import store

    path = models[("letterbox", "coco91")]
    result = evaluate_model(path, coco_dir=synth, limit=5, results_file=tmp_path / "r.json",
                            cache_file=tmp_path / "c.jsonl")
    record = store.load(kind="eval", model="bright-box").records[-1]
    assert record["created"] == result.record["created"]
    assert record["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["provider"] == "cpu"
    assert "onnxruntime-gpu" in record["versions"] or "onnxruntime" in record["versions"]
    data = record["data"]
    assert set(data["stats"]) == set(STAT_NAMES)
    ann = synth / "annotations" / "instances_val2017.json"
    assert data["annotations_sha256"] == hashlib.sha256(ann.read_bytes()).hexdigest()
    assert data["dataset"]["image_count"] == 5 and data["images_evaluated"] == 5 and data["images_skipped"] == []
    assert data["map50"] == data["stats"]["AP50"] and data["map"] == data["stats"]["AP"]
    assert data["backend"] == "pycocotools" and data["resize"] == "letterbox"
    assert 0 < data["session_seconds"] <= data["loop_seconds"] <= data["wall_seconds"]


def test_prefetch_keeps_order_and_a_bounded_lead():
    lock = threading.Lock()
    state = {"produced": 0, "consumed": 0, "max_lead": 0}

    def work(i):
        time.sleep(0.002 * (i % 3))  # out-of-order completion
        with lock:
            state["produced"] += 1
            state["max_lead"] = max(state["max_lead"], state["produced"] - state["consumed"])
        return i

    got = []
    for item in prefetched(range(40), work, workers=3, prefetch=4):
        time.sleep(0.003)  # a slower consumer: the workers must wait, not run ahead
        got.append(item)
        with lock:
            state["consumed"] += 1
    assert got == list(range(40))
    assert state["max_lead"] <= 4 + 1  # the prefetch window plus the item being handed over
    with pytest.raises(ConfigError):
        list(prefetched(range(3), work, workers=0))


def test_cli_eval_renders_scores_and_timings(synth, tmp_path, models):
    from typer.testing import CliRunner

    import cli

    out = CliRunner().invoke(cli.app, ["eval", str(models[("stretch", "coco80")]), "--coco", str(synth),
                                       "--out", str(tmp_path / "r.json"), "--cache", str(tmp_path / "c.jsonl")])
    assert out.exit_code == 0, out.output
    assert "mAP@0.5 = 100.00" in out.output and "inside session.run" in out.output and "images/s" in out.output
    bad = CliRunner().invoke(cli.app, ["eval", str(models[("stretch", "coco80")]), "--coco", str(tmp_path / "none")])
    assert bad.exit_code == DatasetError.exit_code


def test_cli_describes_a_bare_model_and_selects_images(synth, tmp_path):
    from typer.testing import CliRunner

    import cli

    bare = bright_box_detector(tmp_path / "bare.onnx", height=H, width=W, metadata=False)
    base = ["eval", str(bare), "--coco", str(synth), "--out", str(tmp_path / "r.json"), "--cache", str(tmp_path / "c.jsonl")]
    refused = CliRunner().invoke(cli.app, base)
    assert refused.exit_code == ContractError.exit_code and "--input-size HxW" in refused.output
    out = CliRunner().invoke(cli.app, base + ["--input-size", f"{H}x{W}", "--resize", "letterbox",
                                              "--label-space", "coco80", "--image-ids", "1,3,5"])
    assert out.exit_code == 0, out.output
    assert "3 of 3 images evaluated" in out.output
    assert sorted({d["image_id"] for d in json.loads((tmp_path / "r.json").read_text())}) == [1, 3, 5]


def test_a_provider_that_cannot_run_is_refused(synth, models):
    from core.errors import ProviderUnavailableError
    from runtime.backends import provider_usable

    usable, _ = provider_usable("cuda")
    if usable:
        pytest.skip("CUDA runs here: the refusal of an unusable provider cannot be shown with it")
    with pytest.raises(ProviderUnavailableError, match="cuda"):
        evaluate_model(models[("letterbox", "coco80")], coco_dir=synth, provider="cuda", store=False)
