"""The one IoU and the one NMS of ``exporters.matching``, against libraries that compute them
independently: torchvision's ``box_iou`` and onnxruntime's ``NonMaxSuppression`` operator (whose
semantics the numpy NMS claims, since foreign-ONNX validation compares a wrapped file's in-graph
NMS with it)."""

import numpy as np
import pytest

from exporters.matching import iou, nms


def _boxes(rng, n, flip=0.0):
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (n, 2))], axis=1)
    flipped = rng.random(n) < flip  # the same box given by its other diagonal (x2 < x1, y2 < y1)
    boxes[flipped] = boxes[flipped][:, [2, 3, 0, 1]]
    return boxes


def test_iou_matrix_is_torchvision_box_iou():
    torch = pytest.importorskip("torch")
    box_iou = pytest.importorskip("torchvision.ops").box_iou
    rng = np.random.default_rng(3)
    a, b = _boxes(rng, 40), _boxes(rng, 25)
    b[:5] = a[:5]  # identical boxes: IoU 1
    got = iou(a, b)
    assert got.shape == (40, 25) and got.dtype == np.float64
    np.testing.assert_allclose(got, box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-12, atol=1e-15)
    assert np.allclose(np.diag(got[:5, :5]), 1.0) and (got > 0).any() and (got == 0).any()


def test_iou_by_hand_and_corner_order():
    # (0,0,10,10) and (5,0,15,10): 50 of a union of 150; the second given by its other diagonal
    a, b, b_flipped = np.array([[0, 0, 10, 10.]]), np.array([[5, 0, 15, 10.]]), np.array([[15, 10, 5, 0.]])
    assert iou(a, b)[0, 0] == pytest.approx(1 / 3)
    assert iou(a, b_flipped)[0, 0] == 0.0  # without ordering, a flipped box overlaps nothing
    assert iou(a, b_flipped, order_corners=True)[0, 0] == pytest.approx(1 / 3)
    assert iou(np.zeros((0, 4)), b).shape == (0, 1)
    assert iou(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32  # computed in the boxes' dtype


def _onnxruntime_nms(boxes, scores, iou_threshold, score_threshold, max_per_class):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "cap", "iou", "score"], ["selected"])
    graph = helper.make_graph(
        [node], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, None, None])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
        [helper.make_tensor("cap", TensorProto.INT64, [1], [max_per_class]),
         helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou_threshold]),
         helper.make_tensor("score", TensorProto.FLOAT, [1], [score_threshold])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"boxes": boxes[None].astype(np.float32),
                              "scores": scores.T[None].astype(np.float32)})[0]


@pytest.mark.parametrize("seed, cap", [(0, 1000), (1, 1000), (2, 20)])
def test_nms_keeps_what_onnxruntime_keeps(seed, cap):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(seed)
    n, classes = 300, 3
    boxes = _boxes(rng, n, flip=0.3).astype(np.float32).astype(np.float64)
    # float32-exact scores so both sides rank the same values; some equal scores
    scores = np.round(rng.random((n, classes)) * 64).astype(np.float32).astype(np.float64) / 64
    selected = _onnxruntime_nms(boxes, scores, 0.45, 0.2, cap)
    expected = sorted(((float(scores[i, c]), int(c), int(i)) for _, c, i in selected), key=lambda k: -k[0])[:cap]

    got_boxes, got_scores, got_classes = nms(boxes, scores, 0.45, 0.2, cap)
    assert len(selected) < (scores > 0.2).sum()  # NMS suppressed something
    assert (len(selected) > cap) == (cap == 20)  # the capped case: the overall cap bites
    assert [(s, c) for s, c, _ in expected] == list(zip(got_scores.tolist(), got_classes.tolist()))
    np.testing.assert_array_equal(got_boxes, boxes[[i for _, _, i in expected]])
