"""Accuracy-aware quantization (quantization.budget), the disjoint image sets, `tune`'s Pareto
choice, and the paired bootstrap interval (eval.bootstrap) against pycocotools.

The search's bookkeeping is tested with a fake scorer on a small chain; that ``--max-drop`` is
honoured end to end is tested on the real yolov3-tiny (official weights) made fragile under
INT8 by graph surgery that leaves its float32 outputs unchanged, scored on real COCO images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.contract import ModelContract, attach, read_contract
from core.errors import ConfigError, DatasetError, ExportError
from quantization import budget as budget_module
from quantization.budget import BudgetSettings, quantize_within_budget
from quantization.splits import split_ids
from quantization.tune import Point, TuneSettings, choose, pareto_front, tune

TRAINED = "sha256:" + "ab" * 32  # looks like trained weights: accuracy is expected to be measurable


def _chain(path: Path, weights: str = TRAINED, convs: int = 4) -> Path:
    """Conv x ``convs`` (Relu between) then a head Conv -> boxes/scores/labels, 8x8 input."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, channels = [], [], "images", 3
    for k in range(convs):
        inits.append(numpy_helper.from_array(rng.normal(0, .4, (4, channels, 3, 3)).astype(np.float32), f"w{k}"))
        nodes += [helper.make_node("Conv", [prev, f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}")]
        prev, channels = f"r{k}", 4
    inits += [numpy_helper.from_array(rng.normal(0, .4, (4, 4, 1, 1)).astype(np.float32), "wh"),
              numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    nodes += [helper.make_node("Conv", [prev, "wh"], ["head"], name="head"),
              helper.make_node("Transpose", ["head"], ["t"], name="tr", perm=[0, 2, 3, 1]),
              helper.make_node("Reshape", ["t", "shape"], ["boxes"], name="rs"),
              helper.make_node("ReduceMax", ["boxes"], ["scores"], name="rm", axes=[1], keepdims=0),
              helper.make_node("ArgMax", ["boxes"], ["labels"], name="am", axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [None, 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None]),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    attach(model, ModelContract(name="chain", family="test", framework="onnx", input_height=8, input_width=8,
                                resize="stretch", label_space="coco80", score_threshold=0.0, iou_threshold=0.5,
                                max_detections=64, weights=weights, source_params=0))
    onnx.save(model, str(path))
    return path


def _fake_scores(per_layer: float, all_int8: float, half_width: float = 0.05):
    """A scorer whose mAP@0.5 drop shrinks by ``per_layer`` for each layer the file keeps float (mAP@[.5:.95]
    loses half as much); every change's interval is its point change +- ``half_width``."""
    def score(path, coco_dir, ids, stem):
        extra = read_contract(path).extra
        if extra.get("precision") != "int8":
            return {"map50": 40.0, "map": 20.0}
        kept = len(json.loads(extra.get("kept_float_by_accuracy", "[]")))
        drop = max(0.0, all_int8 - per_layer * kept)
        return {"map50": 40.0 - drop, "map": 20.0 - drop / 2, "half_width": half_width}
    return score


def _fake_compare(reference, candidate, dataset, ids):
    width = candidate.get("half_width", 0.0)
    return {m: _change(m, candidate[m] - reference[m], width, reference[m]) for m in ("map50", "map")}


def _change(metric: str, delta: float, half_width: float, a: float = 40.0, low=None, high=None):
    from eval.bootstrap import Change

    return Change(metric=metric, a=a, b=a + delta, delta=delta, low=delta - half_width if low is None else low,
                  high=delta + half_width if high is None else high, images=32, resamples=200)


def _fake(monkeypatch, **scores):
    monkeypatch.setattr(budget_module, "_score", _fake_scores(**scores))
    monkeypatch.setattr(budget_module, "_compare", _fake_compare)


def test_splits_are_disjoint_and_seeded():
    ids = list(range(1000, 1144))
    a, b = split_ids(ids, seed=0), split_ids(ids, seed=1)
    for s in (a, b):
        assert (len(s.calibration), len(s.selection), len(s.evaluation)) == (16, 32, 96)
        sets = [set(s.calibration), set(s.selection), set(s.evaluation)]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sets[0] | sets[1] | sets[2] == set(ids)
    assert a == split_ids(ids, seed=0) and a.selection != b.selection
    with pytest.raises(DatasetError, match="cannot give"):
        split_ids(ids[:40])


def test_max_drop_keeps_the_most_sensitive_layers_float(tmp_path, coco_dir, monkeypatch):
    _fake(monkeypatch, per_layer=0.4, all_int8=1.0)
    model = _chain(tmp_path / "chain.onnx")
    out = tmp_path / "chain@int8.onnx"
    settings = BudgetSettings(max_drop=0.3, coco_dir=coco_dir, calibration_images=2, selection_images=4,
                              sensitivity_images=2, quantize=budget_module.QuantizeSettings(method="minmax", out=out))
    result = quantize_within_budget(model, settings)
    # all INT8 loses 1.0 (interval +-0.05: clearly beyond 0.3); one layer float 0.6, two 0.2: two layers,
    # the first two in the order of disagreement removed per MAC
    assert result.all_int8_drop == pytest.approx(1.0)
    assert result.kept_float == [name for name, _ in result.sensitivity[:2]]
    gains = [g / max(result.macs[n], 1) for n, g in result.sensitivity if g > 0]
    assert gains == sorted(gains, reverse=True) and len(result.macs) == 4 and min(result.macs.values()) > 0
    assert result.drop == pytest.approx(0.2) and result.drop <= 0.3 and result.verdict.ok
    assert [step["ok"] for step in result.steps] == [False, False, True]
    extra = read_contract(out).extra
    assert json.loads(extra["kept_float_by_accuracy"]) == sorted(result.kept_float)
    assert json.loads(extra["selection_image_ids"]) == list(result.split.selection)
    assert json.loads(extra["calibration_image_ids"]) == list(result.split.calibration)
    assert float(extra["accuracy_budget_selection_drop"]) == pytest.approx(0.2)
    assert extra["accuracy_budget_rule"] == budget_module.RULE
    recorded = json.loads(extra["accuracy_budget_selection_change"])
    assert recorded["map50"]["delta"] == pytest.approx(-0.2) and recorded["map50"]["low"] == pytest.approx(-0.25)
    assert recorded["map"]["high"] == pytest.approx(-0.05)
    # kept-float layers really have float weights in the written file
    written = onnx.load(str(out))
    by_name = {n.name: n for n in written.graph.node}
    inits = {i.name: i for i in written.graph.initializer}
    for name in result.kept_float:
        assert inits[by_name[name].input[1]].data_type == TensorProto.FLOAT
    # evaluation refuses selection images (and calibration ones) before running anything
    from eval.coco import evaluate_model

    with pytest.raises(ConfigError, match="float layers chosen on 1 .*--allow-calibration-overlap"):
        evaluate_model(out, coco_dir=coco_dir, image_ids=[result.split.selection[0]], store=False)
    with pytest.raises(ConfigError, match="calibrated on 1 "):
        evaluate_model(out, coco_dir=coco_dir, image_ids=[result.split.calibration[0]], store=False)
    from core.calibration import calibration_overlap

    assert calibration_overlap(read_contract(out), result.split.evaluation) == []


def test_budget_that_cannot_be_met_writes_nothing(tmp_path, coco_dir, monkeypatch):
    _fake(monkeypatch, per_layer=0.0, all_int8=1.0)
    out = tmp_path / "never.onnx"
    settings = BudgetSettings(max_drop=0.1, coco_dir=coco_dir, calibration_images=2, selection_images=4,
                              sensitivity_images=1, quantize=budget_module.QuantizeSettings(method="minmax", out=out))
    with pytest.raises(ExportError, match="no INT8 file found within --max-drop 0.1.*nothing was written"):
        quantize_within_budget(_chain(tmp_path / "chain.onnx", convs=2), settings)
    assert not out.exists()


def test_a_drop_within_the_selection_noise_is_not_chased(tmp_path, coco_dir, monkeypatch):
    """All INT8 measures 0.8 point down on the selection images, interval +-1.5: nothing shows a loss
    beyond 0.3, so no layer is kept float (the point-estimate rule kept two, chasing noise)."""
    _fake(monkeypatch, per_layer=0.4, all_int8=0.8, half_width=1.5)
    out = tmp_path / "noise@int8.onnx"
    settings = BudgetSettings(max_drop=0.3, coco_dir=coco_dir, calibration_images=2, selection_images=4,
                              sensitivity_images=1, quantize=budget_module.QuantizeSettings(method="minmax", out=out))
    result = quantize_within_budget(_chain(tmp_path / "chain.onnx"), settings)
    assert result.kept_float == [] and result.drop == pytest.approx(0.8) and len(result.steps) == 1
    assert json.loads(read_contract(out).extra["kept_float_by_accuracy"]) == []


def test_a_large_drop_on_a_wide_interval_and_the_optional_point_bound(tmp_path, coco_dir, monkeypatch):
    """All INT8 loses 3.01 points on an interval +-4 that reaches the budget: the default rule accepts it
    (within the noise of the selection images); with point_slack=1 it is refused (and 2.01 after it),
    and 1.01 is within budget + 1; the rule recorded says which."""
    _fake(monkeypatch, per_layer=1.0, all_int8=3.01, half_width=4.0)
    model = _chain(tmp_path / "chain.onnx")

    def settings(out, **extra):
        return BudgetSettings(max_drop=0.3, coco_dir=coco_dir, calibration_images=2, selection_images=4,
                              sensitivity_images=1, quantize=budget_module.QuantizeSettings(method="minmax", out=out),
                              **extra)

    default = quantize_within_budget(model, settings(tmp_path / "a@int8.onnx"))
    assert default.kept_float == [] and [round(step["drop"], 2) for step in default.steps] == [3.01]
    assert read_contract(tmp_path / "a@int8.onnx").extra["accuracy_budget_rule"] == budget_module.RULE
    bounded = quantize_within_budget(model, settings(tmp_path / "b@int8.onnx", point_slack=1.0))
    assert [round(step["drop"], 2) for step in bounded.steps] == [3.01, 2.01, 1.01]
    assert len(bounded.kept_float) == 2
    assert read_contract(tmp_path / "b@int8.onnx").extra["accuracy_budget_rule"].endswith("budget + 1")


def test_stop_rule_on_fake_measurements():
    from quantization.budget import budget_verdict

    def verdict(d50, w50, dmap, wmap, budget=0.3, **interval):
        return budget_verdict({"map50": _change("map50", d50, w50, **interval), "map": _change("map", dmap, wmap)},
                              budget)

    # within the noise: 0.8 point down, interval reaches +0.7 (the point-estimate rule refused it)
    assert verdict(-0.8, 1.5, -0.2, 0.6).ok
    # yolov3-tiny's all-INT8 file on split seed 0's selection images: within the noise by default
    seed0 = {"map50": _change("map50", -3.39, 0.0, low=-7.01, high=0.08),
             "map": _change("map", -1.18, 0.0, low=-3.81, high=0.53)}
    assert budget_verdict(seed0, 0.3).ok and budget_verdict(seed0, 0.3).drop == pytest.approx(3.39)
    # the optional point bound refuses it
    refused = budget_verdict(seed0, 0.3, slack=1.0)
    assert not refused.ok and "point drop 3.39 > budget + 1" in refused.reasons[0]
    with pytest.raises(ConfigError, match="slack"):
        budget_verdict(seed0, 0.3, slack=-1.0)
    # a loss shown beyond the budget: high end -0.35 < -0.3, on either metric
    assert not verdict(-0.6, 0.25, 0.0, 0.2).ok
    assert not verdict(0.0, 0.2, -0.6, 0.25).ok
    # the boundaries: high end exactly -budget and point drop exactly budget + 1 are accepted
    assert verdict(-0.75, 0.0, 0.0, 0.1, budget=0.5, high=-0.5).ok
    assert not verdict(-0.75, 0.0, 0.0, 0.1, budget=0.5, high=-0.5625).ok
    slack = {"map50": _change("map50", -1.5, 2.0), "map": _change("map", 0.0, 0.1)}
    assert budget_verdict(slack, 0.5, slack=1.0).ok
    assert not budget_verdict({**slack, "map50": _change("map50", -1.5625, 2.0)}, 0.5, slack=1.0).ok
    # budget 0: a change whose interval holds 0 passes, a measured loss does not
    assert verdict(0.0, 0.0, 0.0, 0.0, budget=0.0).ok
    assert verdict(-0.4, 0.5, 0.1, 0.3, budget=0.0).ok
    assert not verdict(-0.4, 0.3, 0.1, 0.3, budget=0.0).ok
    with pytest.raises(ConfigError, match="--max-drop"):
        verdict(0.0, 0.1, 0.0, 0.1, budget=-0.1)


def test_layers_ordered_by_gain_per_mac_and_counted_by_hand(tmp_path):
    from quantization.quantize import layer_macs, quantizable_layers
    from quantization.budget import order_by_gain_per_mac

    gains = [("big", 0.20), ("small", 0.05), ("none", 0.0), ("worse", -0.1), ("mid", 0.10)]
    macs = {"big": 1000, "small": 10, "none": 5, "worse": 1, "mid": 100}
    assert [n for n, _ in order_by_gain_per_mac(gains, macs)] == ["small", "mid", "big", "none", "worse"]
    model = _chain(tmp_path / "chain.onnx")
    names = [name for name, _ in quantizable_layers(model)]
    counted = layer_macs(model, names)
    # 8x8 output, 4 output channels, 3x3 kernels: 3 input channels for the first, 4 for the others
    assert sorted(counted.values()) == [8 * 8 * 4 * 3 * 9] + [8 * 8 * 4 * 4 * 9] * 3


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_bad_budget_is_refused(tmp_path, coco_dir, bad):
    with pytest.raises(ConfigError, match="--max-drop"):
        quantize_within_budget(_chain(tmp_path / "m.onnx"), BudgetSettings(max_drop=bad, coco_dir=coco_dir))
    with pytest.raises(ConfigError, match="--max-drop"):
        tune(_chain(tmp_path / "m.onnx"), TuneSettings(max_drop=bad, coco_dir=coco_dir))


def test_no_coco_data_and_no_trained_weights(tmp_path, coco_dir):
    with pytest.raises(DatasetError):
        quantize_within_budget(_chain(tmp_path / "m.onnx"), BudgetSettings(max_drop=0.5, coco_dir=tmp_path / "none"))
    with pytest.raises(DatasetError):
        tune(_chain(tmp_path / "m.onnx"), TuneSettings(max_drop=0.5, coco_dir=tmp_path / "none", record=False))
    random = _chain(tmp_path / "r.onnx", weights="random-init")
    with pytest.raises(ConfigError, match="accuracy cannot be measured"):
        quantize_within_budget(random, BudgetSettings(max_drop=0.5, coco_dir=coco_dir))
    # tune offers speed only: float32 on onnxruntime CPU, no drop, the fastest named as speed only
    result = tune(random, TuneSettings(max_drop=0.5, coco_dir=tmp_path / "none", backends=("cpu",), threads=(1,),
                                       bench_seconds=0.3, record=False))
    assert not result.accuracy_measured
    assert any("accuracy cannot be measured" in n for n in result.notes)
    assert {p.precision for p in result.points} == {"f32"} and all(p.drop is None for p in result.points)
    assert result.chosen is not None and result.chosen.drop is None


def test_pareto_and_choice_on_fake_measurements():
    pts = [Point("cpu", "f32", 2, "m.onnx", 40.0, True, drop=0.0),
           Point("cpu", "f32", 1, "m.onnx", 70.0, True, drop=0.0),       # slower, same drop: dominated
           Point("cpu", "int8", 2, "q.onnx", 25.0, True, drop=0.4),
           Point("openvino", "int8", 2, "q.onnx", 20.0, True, drop=0.9),  # fastest but over budget
           Point("openvino", "f32", 2, "m.onnx", 30.0, False, drop=0.05),
           Point("cpu", "int8", 1, "q.onnx", 26.0, True, drop=0.5)]      # dominated by cpu int8 2t
    front = pareto_front(pts)
    assert [p.label for p in front] == ["openvino int8 2t", "cpu int8 2t", "openvino f32 2t", "cpu f32 2t"]
    chosen, speedup = choose(pts, 0.5, reference=pts[0])
    assert chosen.label == "cpu int8 2t" and speedup == pytest.approx(40.0 / 25.0)
    assert [p.within_budget for p in pts] == [True, True, True, False, True, True]
    # an INVALID latency is chosen only when no VALID one is within budget
    chosen, _ = choose(pts, 0.1, reference=pts[0])
    assert chosen.label == "cpu f32 2t"
    assert choose(pts, 0.0, reference=None)[0].label == "cpu f32 2t"
    assert choose([Point("cpu", "int8", 1, "q", 5.0, True, drop=1.0)], 0.5, None) == (None, None)
    # a point judged from its intervals keeps that judgement: 0.8 point down within the noise is within 0.5
    noisy = Point("cpu", "int8", 1, "q", 5.0, True, drop=0.8, within_budget=True,
                  changes={"map50": {"delta": -0.8, "low": -2.3, "high": 0.7}})
    assert choose([noisy, pts[0]], 0.5, reference=pts[0])[0] is noisy and noisy.within_budget


def test_bootstrap_matches_pycocotools_and_brackets_a_change(coco_dir):
    """With every image once, the bootstrap's mAPs are pycocotools' own; a model against itself
    changes by exactly 0; a shifted copy loses, and its interval holds the measured change."""
    from eval.bootstrap import paired_change
    from eval.coco import score_results

    gt = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    ids = sorted(int(i["id"]) for i in gt["images"])[:12]
    rng = np.random.default_rng(0)
    by_id = {i: [a for a in gt["annotations"] if a["image_id"] == i] for i in ids}
    detections = [{"image_id": i, "category_id": a["category_id"], "score": float(rng.uniform(0.3, 1.0)),
                   "bbox": [a["bbox"][0] + float(rng.normal(0, 2)), a["bbox"][1] + float(rng.normal(0, 2)), *a["bbox"][2:]]}
                  for i in ids for a in by_id[i] if not a.get("iscrowd")]
    worse = [dict(d, bbox=[d["bbox"][0] + 0.15 * d["bbox"][2], *d["bbox"][1:]]) for d in detections]
    change = paired_change(detections, worse, gt, ids, resamples=30)
    ref_a, ref_b = score_results(detections, gt, image_ids=ids), score_results(worse, gt, image_ids=ids)
    for metric in ("map50", "map"):
        assert change[metric].a == pytest.approx(100 * ref_a[metric], abs=1e-9)
        assert change[metric].b == pytest.approx(100 * ref_b[metric], abs=1e-9)
        assert change[metric].low <= change[metric].delta <= change[metric].high
    assert change["map"].delta < 0 and not change["map"].within_noise
    same = paired_change(detections, detections, gt, ids, resamples=10)
    assert same["map"].delta == 0 and same["map"].low == 0 == same["map"].high and same["map"].within_noise
    with pytest.raises(ConfigError):
        paired_change(detections, worse, gt, ids[:1])


def test_compare_calls_a_drop_within_the_noise_one(coco_dir, tmp_path):
    """compare's mAP change carries the paired interval: one image's detections dropped out of
    twelve is a drop within the noise; every box shifted is a loss."""
    from report.compare import compare_accuracy

    annotations = coco_dir / "annotations" / "instances_val2017.json"
    gt = json.loads(annotations.read_text())
    ids = sorted(int(i["id"]) for i in gt["images"])[:12]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9, "bbox": a["bbox"]}
            for a in gt["annotations"] if a["image_id"] in ids and not a.get("iscrowd")]
    lost_one = [d for d in dets if d["image_id"] != ids[3]]
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2], *d["bbox"][1:]]) for d in dets]

    def record(results, name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(results))
        from eval.coco import score_results

        scores = score_results(results, gt, image_ids=ids)
        return {"map50": scores["map50"], "map": scores["map"], "images_evaluated": len(ids),
                "annotations_sha256": "same", "results_file": str(path),
                "dataset": {"annotations_file": str(annotations)}}

    base = record(dets, "a")
    noisy = compare_accuracy(base, record(lost_one, "b"), 0.1, settings={"image_ids": ids})
    assert noisy.delta_map_points < -0.1 and noisy.verdict == "within the noise", noisy
    assert noisy.intervals["map"]["low"] < 0 < noisy.intervals["map"]["high"] + 1e-12
    loss = compare_accuracy(base, record(shifted, "c"), 0.1, settings={"image_ids": ids})
    assert loss.verdict == "less accurate" and loss.intervals["map"]["high"] < 0
    gone = compare_accuracy(base, {**record(shifted, "d"), "results_file": str(tmp_path / "missing.json")}, 0.1)
    assert gone.verdict == "less accurate" and not gone.intervals and "no interval" in gone.interval_note


def test_quantize_cli_interrupt_and_escaping_external_data(tmp_path, coco_dir, monkeypatch):
    """Ctrl-C during `quantize` says nothing was written (exit 130); a file whose external data
    points outside its folder is a contract error (exit 5) as for profile/bench/eval, not a traceback."""
    from typer.testing import CliRunner

    import cli
    import quantization.quantize as quantize_module

    model = _chain(tmp_path / "m.onnx")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(quantize_module, "quantize_model", interrupted)
        result = CliRunner().invoke(cli.app, ["quantize", str(model), "--calibration", str(coco_dir)])
    assert result.exit_code == 130
    assert "nothing was written" in result.output and not (tmp_path / "m@int8.onnx").exists()

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.zeros(4 * 3 * 3 * 3 * 4, np.uint8).tobytes())
    escaping = onnx.load(str(model))
    weight = next(i for i in escaping.graph.initializer if i.name == "w0")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    onnx.save(escaping, str(folder / "escaping.onnx"))
    result = CliRunner().invoke(cli.app, ["quantize", str(folder / "escaping.onnx"), "--calibration", str(coco_dir)])
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output and "escaping.onnx" in result.output


# --------------------------------------------------------------------------- a real model that misses the budget

OUTLIER_LAYER = "convolutional_4"  # the third convolution: 199 M MACs like most layers, not the cheap first one
OUTLIER_SCALE = 2.0 ** 13


def _with_activation_outlier(source: Path, target: Path, layer: str = OUTLIER_LAYER,
                             scale: float = OUTLIER_SCALE) -> Path:
    """``source`` (a Darknet export: Conv -> BatchNormalization -> LeakyRelu) with one output channel
    of ``layer`` scaled by ``scale`` (its BatchNorm scale and bias) and scaled back by a Mul after
    the LeakyRelu (named in the file's metadata, ``test_surgery``).

    Float32 computes the very same numbers: a power of two commutes with rounding, and BatchNorm
    folding, the convolution's sums and LeakyRelu are all positively homogeneous. The Mul sits after
    the activation because onnxruntime's basic optimizations (run before quantizing) fold a Mul
    right after the BatchNorm into the convolution's weights, undoing the outlier; and it is not one
    of the ops the quantizer runs on 8-bit data, so with ``layer`` quantized its output and the
    LeakyRelu's carry one per-tensor uint8 range set by the outlier: a step of ~8192 x the channel's
    largest value / 255, and every other channel rounds to the zero point. With ``layer`` kept
    float, the chain after it stays float up to the Mul and the next convolution reads ordinary
    values: one layer kept float repairs it."""
    from dataclasses import replace as replaced

    from core.contract import save_model

    model = onnx.load(str(source))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    bn = next(n for n in graph.node if n.name == f"{layer}.bn")
    leaky = next(n for n in graph.node if n.name == f"{layer}.leaky")
    gamma, beta = (numpy_helper.to_array(inits[bn.input[k]]).copy() for k in (1, 2))
    # the channel whose BatchNorm shift is largest is far from zero on every image, so every
    # calibration image carries the outlier
    channel = int(np.argmax(np.abs(beta)))
    gamma[channel] *= scale
    beta[channel] *= scale
    for k, value in ((1, gamma), (2, beta)):
        inits[bn.input[k]].CopyFrom(numpy_helper.from_array(value, bn.input[k]))
    undo = np.ones((1, len(beta), 1, 1), np.float32)
    undo[0, channel] = 1.0 / scale
    graph.initializer.append(numpy_helper.from_array(undo, f"const.{layer}.undo"))
    activation, restored = leaky.output[0], f"{leaky.output[0]}.undo"
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == activation:
                node.input[k] = restored
    position = list(graph.node).index(leaky) + 1
    graph.node.insert(position, helper.make_node("Mul", [activation, f"const.{layer}.undo"], [restored],
                                                 name=f"{layer}.undo"))
    contract = read_contract(source)
    contract = replaced(contract, name=f"{contract.name}-outlier",
                        extra={**contract.extra, "test_surgery": f"{layer} channel {channel} x {scale:g}, undone "
                               "after its LeakyRelu"})
    save_model(model, target, contract)
    return target


def _eval(path: Path, coco_dir: Path, ids, stem: Path) -> list[dict]:
    from eval.coco import evaluate_model

    result = evaluate_model(path, coco_dir=coco_dir, image_ids=tuple(ids), store=False,
                            results_file=stem.with_suffix(".results.json"), cache_file=stem.with_suffix(".cache.jsonl"))
    return json.loads(Path(result.results_file).read_text())


def test_max_drop_on_a_real_model_whose_all_int8_file_misses_the_budget(exported, darknet_dir, coco_dir, tmp_path):
    """yolov3-tiny (official weights) with an activation outlier in one convolution: float32 outputs
    unchanged, all-INT8 loses most of its mAP on the selection images (COCO scoring, no fake), and
    ``--max-drop 1`` keeps exactly that convolution float and ends within the budget; the written
    file's drop on evaluation images is measured too. Ignoring the budget (all-INT8 written) fails."""
    import onnxruntime as ort

    from core.images import load_rgb, prepare_for
    from eval.bootstrap import paired_change
    from eval.dataset import load_coco
    from quantization.quantize import QuantizeSettings

    max_drop = 1.0
    tiny = exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights").path
    model = _with_activation_outlier(tiny, tmp_path / "yolov3-tiny-outlier.onnx")
    layer = f"{OUTLIER_LAYER}.conv"
    dataset = load_coco(coco_dir)
    settings = BudgetSettings(max_drop=max_drop, coco_dir=coco_dir, calibration_images=4, selection_images=8,
                              sensitivity_images=2,
                              quantize=QuantizeSettings(method="minmax", out=tmp_path / "outlier@int8.onnx"))
    split = split_ids(dataset.images, settings.seed, settings.calibration_images, settings.selection_images)

    # float32: the same detections as the exported model on a real COCO image (within 1e-4 relative)
    image = dataset.images[split.evaluation[0]].path
    tensor = prepare_for(load_rgb(image), read_contract(tiny))[0]
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": tensor})
               for p in (tiny, model)]
    assert len(outputs[0][0]) > 0, f"no detection on {image.name}: nothing would be compared"
    for reference, built in zip(*outputs):
        assert reference.shape == built.shape and reference.dtype == built.dtype
        if reference.dtype.kind == "f":
            assert np.abs(built - reference).max() <= 1e-4 * np.abs(reference).max()
        else:
            assert np.array_equal(reference, built)

    result = quantize_within_budget(model, settings)
    assert result.split == split

    # all INT8 misses the budget on the selection images: a loss shown beyond -1 point on both metrics
    first = result.steps[0]
    assert first["kept_float"] == [] and not first["ok"]
    for metric in ("map50", "map"):
        assert first["changes"][metric]["high"] < -max_drop, first["changes"]
    assert result.all_int8_drop > 10.0, result.steps
    assert first["map50"] < 0.1 * result.float_scores["map50"], result.steps
    # the search keeps the damaged convolution, alone, float: the sensitivity found it (its float copy
    # removes most of the disagreement, no other layer's does)
    assert result.kept_float == [layer], (result.kept_float, result.steps)
    gains = dict(result.sensitivity)
    assert result.sensitivity[0][0] == layer and gains[layer] > 0.5, result.sensitivity
    assert all(gain < 0.1 * gains[layer] for name, gain in gains.items() if name != layer), result.sensitivity
    # ... and ends within the budget by the rule the file records
    assert result.verdict.ok and result.steps[-1]["ok"] and len(result.steps) == 2
    for metric, change in result.changes.items():
        assert change.high >= -max_drop and change.images == 8, change
    assert result.drop < 0.5 * result.all_int8_drop
    extra = read_contract(result.path).extra
    assert extra["precision"] == "int8" and extra["accuracy_budget_rule"] == budget_module.RULE
    assert json.loads(extra["kept_float_by_accuracy"]) == [layer]
    assert float(extra["accuracy_budget_max_drop"]) == max_drop
    assert float(extra["accuracy_budget_all_int8_drop"]) == pytest.approx(result.all_int8_drop, abs=1e-4)
    recorded = json.loads(extra["accuracy_budget_selection_change"])
    assert all(recorded[m]["high"] >= -max_drop for m in ("map50", "map")), recorded
    assert json.loads(extra["selection_image_ids"]) == list(split.selection)
    written = onnx.load(str(result.path))
    inits = {i.name: i for i in written.graph.initializer}
    conv = next(n for n in written.graph.node if n.name == layer)
    assert inits[conv.input[1]].data_type == TensorProto.FLOAT
    # the other ten quantized convolutions read their weights through DequantizeLinear (int8)
    assert sum(1 for i in written.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4) == 10

    # the written file's drop on evaluation images, never seen by calibration or selection: it keeps
    # most of the float model's mAP there, and shows no loss beyond the budget either (16 images:
    # +1.59 [-0.17, +3.16] mAP@0.5, +0.34 [-0.63, +0.87] mAP@[.5:.95] points when written)
    ids = split.evaluation[:16]
    change = paired_change(_eval(model, coco_dir, ids, tmp_path / "eval-float"),
                           _eval(result.path, coco_dir, ids, tmp_path / "eval-int8"), dataset, ids, resamples=1000)
    shown = "; ".join(c.describe() for c in change.values())
    assert change["map50"].a > 10.0 and change["map50"].b > 0.5 * change["map50"].a, shown
    assert all(c.high >= -max_drop for c in change.values()), shown
