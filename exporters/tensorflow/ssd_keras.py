"""SSD300 / SSD512 with a VGG-16 backbone (Liu et al., "SSD: Single Shot MultiBox Detector"), in Keras.

The network (layer names follow the authors' Caffe reference, so converted Caffe weights
load by name; the paper calls the extra layers conv8_2 .. conv12_2):

- ``preprocess``: the contract's ``images`` (float32 ``[1, 3, H, W]``, RGB, 0..255) to NHWC,
  optionally RGB -> BGR (the Caffe weights' order), minus a per-channel mean, no scaling;
- VGG-16 ``conv1_1`` .. ``conv5_3`` (3 x 3, ReLU), 2 x 2 max pools with Caffe's ceil rounding
  (``padding="same"``: 75 -> 38 at 300 x 300), ``pool5`` 3 x 3 stride 1, ``fc6`` 3 x 3 dilation 6
  (1024), ``fc7`` 1 x 1 (1024);
- ``conv4_3_norm``: L2 normalisation over channels with a learned per-channel scale (init 20);
- extras ``conv6_1``/``conv6_2`` .. (1 x 1 then 3 x 3, see :data:`EXTRAS`);
- multibox heads: one 3 x 3 convolution per source layer for box offsets (``A * 4`` channels)
  and one for class logits (``A * C``), channel ``a * C + c`` for box ``a`` of a cell.

:func:`build_ssd` returns the raw network: ``mbox_loc`` ``[1, P, 4]`` (offsets
``dx, dy, dw, dh``) and ``mbox_conf`` ``[1, P, C]`` (logits, class 0 = background), prior
order as in :mod:`exporters.tensorflow.ssd_priors`. :func:`detect` adds the in-graph post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exporters.tensorflow.ssd_priors import PriorSpec, default_boxes
from core.errors import ConfigError

# (mid channels, out channels, kernel, stride, padding) of each extra block, per variant.
# SSD300: 19 -> 10 -> 5 -> 3 -> 1; SSD512: 32 -> 16 -> 8 -> 4 -> 2 -> 1 (conv10_2 is 4 x 4, pad 1).
EXTRAS = {
    "300": ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0)),
    "512": ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 4, 1, 1)),
}
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
L2NORM_INIT = 20.0
# torchvision's BoxCoder clamps dw/dh (after the variance) at log(1000/16) so exp() cannot overflow;
# the Caffe decoder does not. Trained SSDs never come near it (62.5 x the prior's size).
DWH_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class SSDConfig:
    """One SSD as built and post-processed here (see ``exporters.tensorflow.export.config_from_spec``)."""

    variant: str  # key of EXTRAS
    input_size: tuple[int, int]  # (H, W)
    num_classes: int  # including background (class 0)
    first_label: int  # the output label of class 1 (0 for coco80, 1 for coco91)
    channel_order: str  # "bgr" | "rgb": the order the first convolution expects
    mean: tuple[float, float, float]  # subtracted from 0..255 values, in ``channel_order``
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    steps: tuple[tuple[float, float], ...] | None  # None: input size / feature-map size
    clip_priors: bool
    variances: tuple[float, float]
    score_threshold: float
    iou_threshold: float
    max_detections: int

    def __post_init__(self):
        if self.variant not in EXTRAS:
            raise ConfigError(f"SSD variant {self.variant!r} is not one of {sorted(EXTRAS)}")
        if self.channel_order not in ("bgr", "rgb"):
            raise ConfigError(f"SSD channel_order {self.channel_order!r} must be 'bgr' or 'rgb'")

    @property
    def source_layers(self) -> tuple[str, ...]:
        extras = tuple(f"conv{6 + i}_2" for i in range(len(EXTRAS[self.variant])))
        return ("conv4_3_norm", "fc7") + extras


def _keras():
    from exporters.tensorflow.convert import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def _layers():
    keras = _keras()
    ops = keras.ops

    class ContractPreprocess(keras.layers.Layer):
        """``[N, 3, H, W]`` RGB 0..255 -> ``[N, H, W, 3]`` in ``channel_order``, minus ``mean``."""

        def __init__(self, channel_order: str, mean, **kwargs):
            super().__init__(**kwargs)
            self.channel_order = channel_order
            self.mean = tuple(float(m) for m in mean)

        def call(self, x):
            x = ops.transpose(x, (0, 2, 3, 1))
            if self.channel_order == "bgr":
                x = ops.take(x, np.array([2, 1, 0], dtype=np.int32), axis=-1)
            return x - ops.convert_to_tensor(np.asarray(self.mean, dtype=np.float32))

    class L2Normalization(keras.layers.Layer):
        """``gamma * x / ||x||`` over channels (Liu et al.'s conv4_3_norm; ParseNet)."""

        def __init__(self, init: float = L2NORM_INIT, **kwargs):
            super().__init__(**kwargs)
            self.init = init

        def build(self, input_shape):
            self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],),
                                         initializer=keras.initializers.Constant(self.init))

        def call(self, x):
            # max(sum x^2, 1e-24) == torch's F.normalize max(||x||, 1e-12)
            return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-24)) * self.gamma

    return keras, ContractPreprocess, L2Normalization


# Standard deviation of random-init biases (see build_ssd).
BIAS_STD = 0.01


def build_ssd(config: SSDConfig, seed: int = 0):
    """The Keras SSD (random, seeded He-normal kernels, small random biases): inputs ``images``, outputs
    ``[mbox_loc [1, P, 4], mbox_conf [1, P, C]]``.

    Raises :class:`ConfigError` when the input is too small for the extra layers.
    """
    keras, ContractPreprocess, L2Normalization = _layers()
    L = keras.layers
    counter = iter(range(seed * 1000, seed * 1000 + 1000))

    # Biases are small but never zero: tf2onnx drops an all-zero bias from the Conv it
    # converts, and the exported graph would then hold fewer parameters than the network.
    def conv(filters, kernel, name, stride=1, dilation=1, padding="same", relu=True):
        return L.Conv2D(filters, kernel, strides=stride, dilation_rate=dilation, padding=padding,
                        activation="relu" if relu else None, name=name,
                        kernel_initializer=keras.initializers.HeNormal(seed=next(counter)),
                        bias_initializer=keras.initializers.RandomNormal(0.0, BIAS_STD, seed=next(counter)))

    height, width = config.input_size
    images = keras.Input(shape=(3, height, width), batch_size=1, name="images")
    x = ContractPreprocess(config.channel_order, config.mean, name="preprocess")(images)
    sources = {}
    for b, widths in enumerate(VGG_BLOCKS, start=1):
        if b > 1:
            # Caffe rounds pooled sizes up; TF's "same" pads the far edge only, which is the same window set
            x = L.MaxPooling2D(2, 2, padding="same", name=f"pool{b - 1}")(x)
        for i, filters in enumerate(widths, start=1):
            x = conv(filters, 3, f"conv{b}_{i}")(x)
        if b == 4:
            sources["conv4_3_norm"] = L2Normalization(name="conv4_3_norm")(x)
    x = L.MaxPooling2D(3, 1, padding="same", name="pool5")(x)
    x = conv(1024, 3, "fc6", dilation=6)(x)
    x = conv(1024, 1, "fc7")(x)
    sources["fc7"] = x
    for i, (mid, out, kernel, stride, pad) in enumerate(EXTRAS[config.variant], start=6):
        x = conv(mid, 1, f"conv{i}_1")(x)
        if pad:
            # explicit symmetric padding: TF's "same" with stride 2 pads only the far edge on even sizes
            x = L.ZeroPadding2D(pad, name=f"conv{i}_2_pad")(x)
        if x.shape[1] < kernel or x.shape[2] < kernel:
            raise ConfigError(f"SSD{config.variant}: input {height}x{width} is too small: conv{i}_2 sees a "
                              f"{x.shape[1]}x{x.shape[2]} map (kernel {kernel}); use a larger --input-size")
        x = conv(out, kernel, f"conv{i}_2", stride=stride, padding="valid")(x)
        sources[f"conv{i}_2"] = x
    anchors = _boxes_per_location(config)
    locs, confs = [], []
    for name, a in zip(config.source_layers, anchors):
        feature = sources[name]
        loc = conv(a * 4, 3, f"{name}_mbox_loc", relu=False)(feature)
        cls = conv(a * config.num_classes, 3, f"{name}_mbox_conf", relu=False)(feature)
        locs.append(L.Reshape((-1, 4), name=f"{name}_mbox_loc_flat")(loc))
        confs.append(L.Reshape((-1, config.num_classes), name=f"{name}_mbox_conf_flat")(cls))
    mbox_loc = L.Concatenate(axis=1, name="mbox_loc")(locs)
    mbox_conf = L.Concatenate(axis=1, name="mbox_conf")(confs)
    return keras.Model(images, [mbox_loc, mbox_conf], name=f"ssd{config.variant}_vgg16")


def _boxes_per_location(config: SSDConfig) -> tuple[int, ...]:
    if len(config.aspect_ratios) != len(config.source_layers):
        raise ConfigError(f"SSD{config.variant} has {len(config.source_layers)} source layers "
                          f"({', '.join(config.source_layers)}) but {len(config.aspect_ratios)} aspect-ratio lists")
    return tuple(2 + 2 * len(r) for r in config.aspect_ratios)


def feature_sizes(model, config: SSDConfig) -> tuple[tuple[int, int], ...]:
    """``(f_h, f_w)`` of each source layer, read from the built network."""
    return tuple((int(model.get_layer(n).output.shape[1]), int(model.get_layer(n).output.shape[2]))
                 for n in config.source_layers)


def prior_spec(model, config: SSDConfig) -> PriorSpec:
    """The priors of ``model``: registered steps, or input size / feature size when none are given."""
    sizes = feature_sizes(model, config)
    height, width = config.input_size
    steps = config.steps or tuple((height / fh, width / fw) for fh, fw in sizes)
    return PriorSpec(config.input_size, sizes, tuple(steps), config.scales, config.aspect_ratios, config.clip_priors)


def head_layers(model, config: SSDConfig) -> list[tuple[str, str]]:
    """``(loc layer, conf layer)`` names per source layer."""
    return [(f"{n}_mbox_loc", f"{n}_mbox_conf") for n in config.source_layers]


def calibrate_random_heads(model, config: SSDConfig, seed: int = 0, loc_std: float = 1.0, conf_std: float = 2.5) -> None:
    """Rescale the heads of a random-init model so its outputs look like a detector's.

    He-normal kernels keep activations near the input's magnitude (~60), so random heads
    would emit offsets of ~100 (boxes 10^8 times their prior) and near-uniform class
    scores (1/C, all tied above a 0.01 threshold). The heads are redrawn (seeded normal)
    with a standard deviation that gives offsets of std ``loc_std`` and logits of std
    ``conf_std`` on a fixed, seeded synthetic image: decoded boxes stay near their priors
    and scores spread from 0 to ~0.9, so a validation compares distinct, real detections.
    """
    keras = _keras()
    rng = np.random.default_rng(seed + 12345)
    height, width = config.input_size
    # smooth colour ramps plus noise: a deterministic image with natural-image magnitudes
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    ramps = np.stack([255 * xx, 255 * yy, 255 * (1 - xx * yy)])
    image = (0.8 * ramps + 0.2 * rng.uniform(0, 255, size=(3, height, width)))[None].astype(np.float32)
    probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in config.source_layers])
    features = probe(image, training=False)
    for feature, (loc_name, conf_name) in zip(features, head_layers(model, config)):
        rms = float(np.sqrt(np.mean(np.square(np.asarray(feature, dtype=np.float64))))) or 1.0
        for name, target in ((loc_name, loc_std), (conf_name, conf_std)):
            layer = model.get_layer(name)
            kernel, bias = layer.get_weights()
            fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
            std = target / (rms * math.sqrt(fan_in))
            layer.set_weights([rng.normal(0.0, std, size=kernel.shape).astype(np.float32),
                               rng.normal(0.0, BIAS_STD, size=bias.shape).astype(np.float32)])


def detect(model, config: SSDConfig, priors: np.ndarray, images):
    """Run the network and the in-graph post-processing on ``images`` (TF tensors).

    Returns a dict of TF tensors: ``boxes`` ``[K, 4]`` (x1, y1, x2, y2 in input pixels),
    ``scores`` ``[K]``, ``labels`` int64 ``[K]`` (class ``c`` -> ``c - 1 + first_label``),
    ``K <= max_detections``; and, for validation, ``prior_boxes`` ``[P, 4]`` (every prior
    decoded, clipped, x1 y1 x2 y2 pixels) and ``prior_scores`` ``[P, C - 1]`` (softmax,
    background dropped). Post-processing: softmax; centre-size decoding with
    ``variances``; dw/dh clamped at :data:`DWH_CLAMP`; boxes clipped to the image; per-class
    greedy NMS (scores > ``score_threshold``, IoU > ``iou_threshold`` suppressed, at most
    ``max_detections`` per class) and the ``max_detections`` best over all classes
    (``tf.image.combined_non_max_suppression``, which tf2onnx maps to ONNX NonMaxSuppression).
    """
    import tensorflow as tf

    height, width = config.input_size
    loc, conf = model(images, training=False)
    loc, conf = loc[0], conf[0]
    p = tf.constant(priors)
    v_centre, v_size = config.variances
    centre = p[:, :2] + loc[:, :2] * v_centre * p[:, 2:]
    size = p[:, 2:] * tf.exp(tf.minimum(loc[:, 2:] * v_size, DWH_CLAMP))
    corners = tf.clip_by_value(tf.concat([centre - 0.5 * size, centre + 0.5 * size], axis=1), 0.0, 1.0)  # x1 y1 x2 y2
    scores = tf.nn.softmax(conf, axis=-1)[:, 1:]
    yxyx = tf.gather(corners, [1, 0, 3, 2], axis=1)
    nms_boxes, nms_scores, nms_classes, valid = tf.image.combined_non_max_suppression(
        yxyx[None, :, None, :], scores[None], max_output_size_per_class=config.max_detections,
        max_total_size=config.max_detections, iou_threshold=config.iou_threshold,
        score_threshold=config.score_threshold, clip_boxes=False)
    k = valid[0]
    pixels = tf.constant([width, height, width, height], dtype=tf.float32)
    boxes = tf.gather(nms_boxes[0, :k], [1, 0, 3, 2], axis=1) * pixels
    labels = tf.cast(nms_classes[0, :k], tf.int64) + config.first_label
    return {"boxes": boxes, "scores": nms_scores[0, :k], "labels": labels,
            "prior_boxes": corners * pixels, "prior_scores": scores}


def decoded_priors(model, config: SSDConfig) -> tuple[PriorSpec, np.ndarray]:
    spec = prior_spec(model, config)
    return spec, default_boxes(spec)
