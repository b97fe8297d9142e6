"""COCO layout loading, its errors, and the coco80 -> COCO category id map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from eval.dataset import COCO80_CATEGORY_IDS, load_coco, resolve_paths
from core.errors import ConfigError, DatasetError

# Darknet's coco.names spells these COCO categories differently (written out by hand).
DARKNET_SPELLINGS = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
                     "pottedplant": "potted plant", "diningtable": "dining table", "tvmonitor": "tv"}


def test_real_subset_loads_in_coco_layout(coco_dir):
    ds = load_coco(coco_dir)
    assert ds.annotations_path == coco_dir / "annotations" / "instances_val2017.json"
    assert len(ds.images) == 144 and len(ds.data["annotations"]) == 1240
    assert all(img.path.is_file() for img in ds.images.values())
    assert ds.check_images_present(ds.select()) == []
    assert len(ds.sha256) == 64


def test_coco80_map_is_the_official_category_order(coco_dir, darknet_dir):
    ds = load_coco(coco_dir)
    table = ds.label_map("coco80")
    # the official annotation file's 80 category ids, sorted, are the coco80 -> id map ...
    assert list(table) == ds.category_ids == list(COCO80_CATEGORY_IDS)
    # ... and index i is the class Darknet (an independent source) calls coco.names[i]
    darknet_names = [n.strip() for n in (darknet_dir / "coco.names").read_text().splitlines() if n.strip()]
    names = ds.category_names
    assert len(darknet_names) == 80
    for index, darknet_name in enumerate(darknet_names):
        assert names[int(table[index])] == DARKNET_SPELLINGS.get(darknet_name, darknet_name), index


def test_coco91_map_is_identity_without_background(coco_dir):
    table = load_coco(coco_dir).label_map("coco91")
    assert table[0] == -1 and table[1] == 1 and table[90] == 90 and len(table) == 91


def test_select_limit_and_ids(coco_dir):
    ds = load_coco(coco_dir)
    ids = sorted(ds.images)
    assert [i.id for i in ds.select(limit=5)] == ids[:5]
    assert [i.id for i in ds.select(image_ids=[ids[7], ids[3]])] == [ids[3], ids[7]]
    with pytest.raises(DatasetError, match="--image-ids: 1 id\\(s\\) are not in .*: 1"):
        ds.select(image_ids=[ids[0], 1])
    with pytest.raises(ConfigError, match="--limit 0"):
        ds.select(limit=0)


def test_missing_annotation_file(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DatasetError, match="annotation file not found: .*instances_val2017.json"):
        load_coco(tmp_path)
    with pytest.raises(DatasetError, match="--coco .*: no such folder"):
        load_coco(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--coco DIR"):
        resolve_paths(annotations=tmp_path / "a.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}]), "top level is a list"),
    (json.dumps({"images": [], "annotations": []}), "no 'categories' list"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}),
     "images\\[0\\] lacks one of id, file_name, width, height"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                 "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
                                  "iscrowd": 0}], "categories": [{"id": 1}]}), "refers to image id 2"),
])
def test_json_that_is_not_coco(tmp_path, content, message):
    ann = tmp_path / "instances.json"
    ann.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        load_coco(annotations=ann, images=tmp_path)
    assert str(ann) in str(err.value)


def test_images_folder_that_does_not_match(coco_dir, tmp_path):
    empty = tmp_path / "images"
    empty.mkdir()
    ds = load_coco(annotations=coco_dir / "annotations" / "instances_val2017.json", images=empty)
    with pytest.raises(DatasetError, match="does not match .*none of the 144 selected image files"):
        ds.check_images_present(ds.select())
    gone = load_coco(annotations=coco_dir / "annotations" / "instances_val2017.json", images=tmp_path / "absent")
    with pytest.raises(DatasetError, match="images folder not found"):
        gone.check_images_present(gone.select())
    # a partly damaged copy is not an error here: the missing files are returned to be skipped and named
    partial = tmp_path / "partial"
    partial.mkdir()
    selection = load_coco(coco_dir).select(limit=4)
    for img in selection[:3]:
        shutil.copy(img.path, partial / img.file_name)
    part = load_coco(annotations=coco_dir / "annotations" / "instances_val2017.json", images=partial)
    assert [i.id for i in part.check_images_present(part.select(limit=4))] == [selection[3].id]


def test_coco80_needs_coco_categories(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 12}, {"id": 95}]}))
    ds = load_coco(annotations=ann, images=tmp_path)
    with pytest.raises(DatasetError, match="category ids \\[12, 95\\] are not among COCO's 80"):
        ds.label_map("coco80")
    assert np.all(ds.label_map("coco91")[[1, 12]] == [1, 12])
