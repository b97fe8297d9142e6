"""Scoring: pycocotools' published numbers, the faster-coco-eval backend, results-file errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.coco import BACKENDS, STAT_NAMES, score_results
from core.errors import ConfigError, DatasetError

# expected_stats.json's key for each of our STAT_NAMES
ORACLE_KEYS = dict(zip(STAT_NAMES, ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10",
                                    "AR100", "AR_small", "AR_medium", "AR_large")))


@pytest.fixture(scope="module")
def oracle(data_dir) -> Path:
    path = data_dir / "cocoapi-oracle"
    if not (path / "expected_stats.json").is_file():
        pytest.fail(f"pycocotools oracle data not found at {path}")
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_reproduces_pycocotools_published_stats(oracle, iou_type, backend):
    expected = json.loads((oracle / "expected_stats.json").read_text())
    section = expected[iou_type]
    got = score_results(oracle / section["results"], oracle / expected["annotations"], backend, iou_type=iou_type)
    for name in STAT_NAMES:
        assert got["stats"][name] == pytest.approx(section["stats"][ORACLE_KEYS[name]], abs=1e-12, rel=0), name
    assert got["map50"] == got["stats"]["AP50"] and got["map"] == got["stats"]["AP"]
    assert got["images"] == 100 and got["iou_type"] == iou_type and got["backend"] == backend


def test_per_category_ap_averages_to_the_overall_ap(oracle):
    # COCOeval's AP is the mean over categories with ground truth of each category's AP
    # (every category has all IoU x recall cells), so the per-category table must average to it.
    got = score_results(oracle / "instances_val2014_fakebbox100_results.json", oracle / "instances_val2014_100.json",
                        per_category=True)
    rows = [row for row in got["per_category"].values() if row["AP"] is not None]
    assert len(got["per_category"]) == 80 and 0 < len(rows) <= 80
    assert sum(r["AP"] for r in rows) / len(rows) == pytest.approx(got["stats"]["AP"], abs=1e-12)
    assert sum(r["AP50"] for r in rows) / len(rows) == pytest.approx(got["stats"]["AP50"], abs=1e-12)
    assert got["per_category"]["person"]["id"] == 1


def test_scoring_twice_gives_the_same_numbers_and_leaves_the_annotations_alone(oracle):
    ann = json.loads((oracle / "instances_val2014_100.json").read_text())
    before = json.dumps(ann, sort_keys=True)
    results = json.loads((oracle / "instances_val2014_fakesegm100_results.json").read_text())
    first = score_results(results, ann, "pycocotools", iou_type="segm")
    second = score_results(results, ann, "faster-coco-eval", iou_type="segm")
    third = score_results(results, ann, "pycocotools", iou_type="segm")
    assert json.dumps(ann, sort_keys=True) == before
    assert first["stats"] == third["stats"]
    for name in STAT_NAMES:
        assert second["stats"][name] == pytest.approx(first["stats"][name], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_detections_at_all_scores_zero(oracle, backend):
    got = score_results([], oracle / "instances_val2014_100.json", backend)
    assert got["detections"] == 0
    # ground truth of every size exists in these 100 images, so every statistic is 0, none is -1
    assert all(value == 0.0 for value in got["stats"].values()), got["stats"]


def test_image_ids_restrict_the_evaluation(oracle):
    ann = json.loads((oracle / "instances_val2014_100.json").read_text())
    results = json.loads((oracle / "instances_val2014_fakebbox100_results.json").read_text())
    some = sorted({img["id"] for img in ann["images"]})[:10]
    subset = score_results(results, ann, image_ids=some)
    # the same numbers as an annotation file cut down to those images by hand
    cut = {**ann, "images": [i for i in ann["images"] if i["id"] in some],
           "annotations": [a for a in ann["annotations"] if a["image_id"] in some]}
    direct = score_results([r for r in results if r["image_id"] in some], cut)
    assert subset["images"] == 10
    assert subset["stats"] == pytest.approx(direct["stats"], abs=1e-12)


def test_bad_results_files_are_named(tmp_path, oracle):
    ann = oracle / "instances_val2014_100.json"
    with pytest.raises(DatasetError, match="results file not found"):
        score_results(tmp_path / "absent.json", ann)
    not_json = tmp_path / "broken.json"
    not_json.write_text("[{\"image_id\": 1,")
    with pytest.raises(DatasetError, match="broken.json is not valid JSON"):
        score_results(not_json, ann)
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="top level must be a list"):
        score_results(as_dict, ann)
    with pytest.raises(DatasetError, match="lacks one of image_id, category_id, score, bbox"):
        score_results([{"image_id": 42, "bbox": [0, 0, 1, 1]}], ann)
    with pytest.raises(DatasetError, match="not in the annotation file, e.g. \\[123456789\\]"):
        score_results([{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}], ann)
    with pytest.raises(ConfigError, match="--backend"):
        score_results([], ann, backend="detectron")


def test_cli_scores_a_results_file_without_a_model(oracle):
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    out = runner.invoke(cli.app, ["eval", "--results", str(oracle / "instances_val2014_fakebbox100_results.json"),
                                  "--annotations", str(oracle / "instances_val2014_100.json")])
    assert out.exit_code == 0, out.output
    assert "0.5046" in out.output and "0.6970" in out.output and "mAP@0.5 = 69.70" in out.output
    missing = runner.invoke(cli.app, ["eval", "--results", str(oracle / "x.json"),
                                      "--annotations", str(oracle / "instances_val2014_100.json")])
    assert missing.exit_code == DatasetError.exit_code and "results file not found" in missing.output


# --------------------------------------------------------------------------- issue 12, rule 4


def _one(**changes) -> dict:
    # image 139 and category 1 (person) are in the shared subset's annotations
    return {"image_id": 139, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9, **changes}


@pytest.fixture(scope="module")
def subset_ann(data_dir) -> dict:
    return json.loads((data_dir / "coco-val2017-subset/annotations/instances_val2017.json").read_text())


@pytest.mark.parametrize("entry, expected", [
    (_one(category_id=999), "entry 0: category_id 999 is not a category of the annotations"),
    (_one(category_id=12), "entry 0: category_id 12 is not a category"),  # a gap in COCO's 1..90 ids
    (_one(bbox=[10, 20, -30, 40]), "entry 0: bbox [10, 20, -30, 40] has a negative width"),
    (_one(bbox=[10, 20, 30, -4]), "entry 0: bbox [10, 20, 30, -4] has a negative height"),
    (_one(bbox=[1, 2, 3]), "entry 0: bbox [1, 2, 3] is 3 values, not a list of 4 numbers x, y, width, height"),
    (_one(bbox=[1, 2, "3", 4]), "entry 0: bbox [1, 2, \"3\", 4] holds a value that is not a finite number"),
    (_one(score=float("nan")), "entry 0: score nan is not a finite number"),
    (["not", "a", "dict"], "entry 0 is a list, not an object"),
])
def test_unscorable_entries_are_rejected_with_index_and_reason(subset_ann, entry, expected):
    with pytest.raises(DatasetError) as err:
        score_results([entry], subset_ann)
    assert expected in str(err.value)
    assert "nothing was scored" in str(err.value)


def test_every_problem_is_collected_and_counted(subset_ann):
    good = [_one() for _ in range(5)]
    bad = [_one(category_id=999 + i) for i in range(10)] + [_one(bbox=[0, 0, -1, 1]), _one(image_id=-5)]
    with pytest.raises(DatasetError) as err:
        score_results(good + bad, subset_ann)
    message = str(err.value)
    assert "(12 problem(s); nothing was scored)" in message
    assert "entry 5: category_id 999" in message and "entry 12: category_id 1006" in message
    assert "... and 4 more problem(s)" in message  # 8 listed of 12
    assert message.count("\n  - ") == 9


def test_a_valid_file_still_scores(subset_ann):
    # Zero-size boxes are legal COCO (they simply never match): only negative sizes are refused.
    scores = score_results([_one(), _one(bbox=[5, 5, 0, 0], score=0.1)], subset_ann, image_ids=[139])
    assert scores["detections"] == 2 and scores["images"] == 1


def test_a_directory_as_results_file_is_named(tmp_path, subset_ann):
    with pytest.raises(DatasetError, match="is a directory: pass the COCO results JSON file"):
        score_results(tmp_path, subset_ann)
