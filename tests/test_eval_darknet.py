"""Accuracy of the Darknet exports through evaluate_model against an independent reference.

The reference (eval/reference_darknet.py) runs the same cfg and weights through
OpenCV's Darknet importer and decodes the raw heads as Darknet's C code does
(0.005 threshold, per-class NMS at 0.45), fed the same letterboxed or stretched
tensor; both result sets are scored by pycocotools on the real val2017 subset.
Parametrised over the registry's Darknet entries: an entry without trained weights
here, or without [yolo] heads, is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.coco import STAT_NAMES, evaluate_model, score_results
from eval.dataset import load_coco
from eval.reference_darknet import DarknetReference, reference_results, top_per_image, yolo_heads
from exporters.registry import load_registry
from exporters.weights import locate_file, locate_weights
from core.errors import ModelDefinitionError

DARKNET_MODELS = [spec.name for spec in load_registry() if spec.framework == "darknet"]
MAP50_TOLERANCE = 0.005  # 0.5 points of mAP@0.5


def _trained(registry, name):
    spec = registry.get(name)
    weights = locate_weights(spec)
    if weights is None:
        pytest.skip(f"{name}: no trained weights here (random-init accuracy means nothing); "
                    f"`python cli.py fetch {name}` to include it")
    cfg = locate_file(spec.source["cfg"])
    try:
        yolo_heads(cfg)
    except ModelDefinitionError as exc:
        pytest.skip(f"{name}: the reference decodes [yolo] heads only ({exc})")
    return spec, cfg, weights


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("name", DARKNET_MODELS)
def test_map50_matches_the_opencv_darknet_reference(name, resize, registry, exported, coco_dir, tmp_path):
    spec, cfg, weights = _trained(registry, name)
    model = exported(name, weights=weights)
    assert not model.contract.random_init
    ours = evaluate_model(model.path, coco_dir=coco_dir, overrides={"resize": resize},
                          results_file=tmp_path / "ours.json", cache_file=tmp_path / "ours.jsonl")
    dataset = load_coco(coco_dir)
    selection = dataset.select()
    reference = reference_results(cfg, weights, selection,
                                  size=(model.contract.input_height, model.contract.input_width), resize=resize)
    ref = score_results(reference, dataset, image_ids=[i.id for i in selection])
    assert ours.images_evaluated == len(selection) == 144 and ours.images_skipped == []
    assert ours.scores["map50"] > 0.15  # trained weights: a broken pipeline scores near 0
    assert abs(ours.scores["map50"] - ref["map50"]) <= MAP50_TOLERANCE, (ours.scores["map50"], ref["map50"])
    # Darknet keeps every detection; the contract caps an export at max_detections per image.
    # With the reference cut the same way, what remains between the two is float noise.
    capped = score_results(top_per_image(reference, model.contract.max_detections), dataset,
                           image_ids=[i.id for i in selection])
    assert abs(ours.scores["map50"] - capped["map50"]) <= 0.001, (ours.scores["map50"], capped["map50"])
    assert abs(ours.scores["map"] - capped["map"]) <= 0.001, (ours.scores["map"], capped["map"])
    # the stored record carries the resize mode actually used
    assert ours.record["data"]["resize"] == resize and ours.record["data"]["map50"] == ours.scores["map50"]
    # faster-coco-eval scores our very results file to the same numbers
    faster = score_results(Path(ours.results_file), dataset, "faster-coco-eval", image_ids=[i.id for i in selection])
    for stat in STAT_NAMES:
        assert faster["stats"][stat] == pytest.approx(ours.scores["stats"][stat], abs=1e-12), stat


@pytest.mark.parametrize("name", DARKNET_MODELS)
def test_reference_decoding_agrees_with_opencvs_own_yolo_layer(name, registry, darknet_dir):
    """Above OpenCV's fixed 0.2 cut its [yolo] layer decodes too: both decodings must agree there."""
    from core.images import load_rgb, prepare

    spec, cfg, weights = _trained(registry, name)
    ref = DarknetReference(cfg, weights)
    tensor, _ = prepare(load_rgb(darknet_dir / "dog.jpg"), spec.height, spec.width, "letterbox")
    boxes, probs = ref.detect(tensor, thresh=0.2)
    yolo_names = [n for n in ref.net.getLayerNames() if n.startswith("yolo_")]
    ref.net.setInput(tensor / 255.0)
    rows = np.concatenate(ref.net.forward(yolo_names))
    theirs = rows[(rows[:, 5:] > 0).any(axis=1)]
    mine_keep = (probs > 0).any(axis=1)
    assert mine_keep.sum() == len(theirs) > 0
    order_m = np.lexsort(boxes[mine_keep].T[::-1])
    order_t = np.lexsort(theirs[:, :4].T[::-1])
    assert np.allclose(boxes[mine_keep][order_m], theirs[order_t, :4], atol=1e-5)
    assert np.allclose(probs[mine_keep][order_m], theirs[order_t, 5:], atol=1e-5)
