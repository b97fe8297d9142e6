"""Accuracy-aware quantization and `tune`: choices made by measuring accuracy on selection images.

Sits above ``eval`` (it scores candidates) and below ``report``: ``splits`` (the three disjoint
image sets), ``budget`` (INT8 within a stated mAP drop), ``tune`` (fastest backend x precision x
threads within that drop, with its Pareto front).
"""
