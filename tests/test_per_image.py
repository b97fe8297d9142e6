"""Per-image operation counts (the seed's per-proposal claim): the same figures as an independent
measured profile of each image, at a memory cost that does not grow with the number of images."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny(exported, darknet_dir) -> Path:
    return exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights").path


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 1e6


def test_counts_equal_a_measured_profile_of_each_image(tiny, coco_dir):
    """profile_model(shapes="measured") builds its own session and shape table per image: an
    independent path to the same analyzer's totals."""
    from counting import profile_model
    from counting.image_counts import ImageCounter

    counter = ImageCounter(tiny)
    images = sorted((coco_dir / "val2017").glob("*.jpg"))[:3]
    for image in images:
        counted = counter.count(image)
        reference = profile_model(tiny, shapes="measured", image=image)
        assert counted.macs == reference.macs
        assert counted.network_macs == reference.network_macs
        assert counted.postprocess_macs == reference.postprocess_macs
    # one-stage: the network's operations do not depend on the picture, post-processing's do
    counts = [counter.count(image) for image in images]
    assert len({c.network_macs for c in counts}) == 1
    assert len({c.postprocess_macs for c in counts}) > 1


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the process's RSS")
def test_memory_does_not_grow_with_the_number_of_images(tiny, coco_dir):
    """Each image once re-allocated the model's weights in the protobuf arena (35 MB per image for
    yolov3-tiny, 24 GB after 89 images of yolov3-416); ten more images must stay well below one copy."""
    from counting.image_counts import ImageCounter

    counter = ImageCounter(tiny)
    images = sorted((coco_dir / "val2017").glob("*.jpg"))[:12]
    for image in images[:2]:
        counter.count(image)
    before = _rss_mb()
    for image in images[2:]:
        counter.count(image)
    assert _rss_mb() - before < 0.5 * tiny.stat().st_size / 1e6
