"""Builders shared by the eval tests: a tiny contract-following detector and a synthetic COCO set.

The detector is a real ONNX graph (onnx.helper), not a stub: it finds the bright
pixels of its input tensor (max over channels > 128), outputs their bounding box in
tensor pixels, labels it by the dominant channel of those pixels, and outputs nothing
when there are none. The synthetic dataset draws one saturated rectangle per image at
known coordinates, so the detections expected in original-image pixels can be worked
out by hand from the drawing alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# dominant channel (R, G, B) -> coco80 label; COCO category ids 1 (person), 3 (car), 16 (bird)
CHANNEL_TO_COCO80 = (0, 2, 14)
CHANNEL_TO_COCO91 = (1, 3, 16)


def bright_box_detector(path: Path, *, height: int = 96, width: int = 128, resize: str = "letterbox",
                        label_space: str = "coco80", metadata: bool = True, batch_outputs: bool = False) -> Path:
    """Write the bright-rectangle detector as a detbench ONNX file (IR 10, opset 17)."""
    import onnx
    from onnx import TensorProto, helper

    from core.contract import DEFAULT_OPSET, IR_VERSION, ModelContract, attach

    table = CHANNEL_TO_COCO80 if label_space == "coco80" else CHANNEL_TO_COCO91
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["chanmax"], axes=[1], keepdims=0),          # [1,H,W]
        helper.make_node("Greater", ["chanmax", "thresh"], ["maskb"]),
        helper.make_node("Cast", ["maskb"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["mask"], ["cols"], axes=[1], keepdims=0),               # [1,W]
        helper.make_node("ReduceMax", ["mask"], ["rows"], axes=[2], keepdims=0),               # [1,H]
        helper.make_node("ArgMax", ["cols"], ["x1"], axis=1, keepdims=0),                      # first bright column
        helper.make_node("ArgMax", ["cols"], ["x2i"], axis=1, keepdims=0, select_last_index=1),
        helper.make_node("ArgMax", ["rows"], ["y1"], axis=1, keepdims=0),
        helper.make_node("ArgMax", ["rows"], ["y2i"], axis=1, keepdims=0, select_last_index=1),
        helper.make_node("Add", ["x2i", "one"], ["x2"]),                                      # exclusive right edge
        helper.make_node("Add", ["y2i", "one"], ["y2"]),
        helper.make_node("Concat", ["x1", "y1", "x2", "y2"], ["box_i"], axis=0),                # [4]
        helper.make_node("Cast", ["box_i"], ["box_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["box_f", "zero_axis"], ["box1"]),                       # [1,4]
        helper.make_node("ReduceMax", ["cols"], ["anyb"], axes=[1], keepdims=0),               # [1] 1.0 or 0.0
        helper.make_node("Mul", ["anyb", "score_scale"], ["score1"]),
        helper.make_node("Unsqueeze", ["mask", "one_axis"], ["mask4"]),                        # [1,1,H,W]
        helper.make_node("Mul", ["images", "mask4"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "hw_axes"], ["chansum"], keepdims=0),         # [1,3]
        helper.make_node("ArgMax", ["chansum"], ["chan"], axis=1, keepdims=0),                 # [1]
        helper.make_node("Gather", ["label_table", "chan"], ["label1"], axis=0),
        helper.make_node("Greater", ["score1", "half"], ["keep"]),
        helper.make_node("Compress", ["box1", "keep"], ["boxes_k"], axis=0),
        helper.make_node("Compress", ["score1", "keep"], ["scores_k"], axis=0),
        helper.make_node("Compress", ["label1", "keep"], ["labels_k"], axis=0),
    ]
    names = ("boxes", "scores", "labels")
    if batch_outputs:
        nodes += [helper.make_node("Unsqueeze", [f"{n}_k", "zero_axis"], [n]) for n in names]
        shapes = ([1, "K", 4], [1, "K"], [1, "K"])
    else:
        nodes += [helper.make_node("Identity", [f"{n}_k"], [n]) for n in names]
        shapes = (["K", 4], ["K"], ["K"])
    inits = [
        helper.make_tensor("thresh", TensorProto.FLOAT, [], [128.0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero_axis", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("hw_axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("score_scale", TensorProto.FLOAT, [], [0.9]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("label_table", TensorProto.INT64, [3], list(table)),
    ]
    graph = helper.make_graph(
        nodes, "bright_box", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, shapes[0]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, shapes[1]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, shapes[2])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    model.ir_version = IR_VERSION
    if metadata:
        attach(model, ModelContract(
            name="bright-box", family="test", framework="onnx", input_height=height, input_width=width,
            resize=resize, label_space=label_space, score_threshold=0.5, iou_threshold=0.5, max_detections=1,
            weights="random-init", source_params=0))
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


# (file id, width, height, rectangle (x1, y1, x2, y2) exclusive or None, channel 0=R 1=G 2=B)
SYNTHETIC_IMAGES = (
    (1, 640, 480, (100, 60, 420, 300), 0),
    (2, 300, 500, (40, 200, 260, 470), 1),
    (3, 416, 416, (10, 10, 200, 150), 2),
    (4, 500, 333, None, 0),               # nothing bright: an empty detection list
    (5, 200, 350, (20, 30, 180, 330), 0),
    (6, 800, 200, (300, 20, 700, 180), 1),
    (7, 333, 250, (50, 40, 300, 230), 2),
    (8, 450, 600, (100, 100, 350, 500), 0),
)


def synthetic_coco(root: Path, images=SYNTHETIC_IMAGES) -> Path:
    """Write ``root/annotations/instances_val2017.json`` and ``root/val2017/*.png``; return ``root``.

    PNG keeps the rectangles' pixel values exact. Each rectangle is one annotation of
    the category its colour stands for; every image lists COCO's 80 categories.
    """
    import cv2

    from eval.dataset import COCO80_CATEGORY_IDS

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    entries, anns = [], []
    for image_id, w, h, rect, channel in images:
        rgb = np.zeros((h, w, 3), dtype=np.uint8)
        name = f"{image_id:012d}.png"
        if rect is not None:
            x1, y1, x2, y2 = rect
            rgb[y1:y2, x1:x2, channel] = 255
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CHANNEL_TO_COCO91[channel],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                         "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
        cv2.imwrite(str(root / "val2017" / name), rgb[:, :, ::-1].copy())
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    categories = [{"id": cid, "name": f"category-{cid}", "supercategory": "x"} for cid in COCO80_CATEGORY_IDS]
    with open(root / "annotations" / "instances_val2017.json", "w") as fh:
        json.dump({"images": entries, "annotations": anns, "categories": categories}, fh)
    return root
