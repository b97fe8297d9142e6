"""INT8 quantization, accuracy-aware quantization and `tune`: choices made by measuring accuracy on selection images.

Sits above ``eval`` (it scores candidates) and below ``report``: ``quantize`` (static INT8 of an
export, a transformation of a contract file rather than an export: it was ``exporters.quantize``),
``splits`` (the three disjoint image sets), ``budget`` (INT8 within a stated mAP drop), ``tune``
(fastest backend x precision x threads within that drop, with its Pareto front). The calibration
ids a quantized file records, which evaluation reads, are in ``core.calibration``.
"""
