"""The report's charts (matplotlib, Agg backend: no display needed).

Every function draws one PNG from :class:`report.collect.ModelRow` objects and RETURNS
the data it drew, so tests can check what is on the chart against the results store.

Conventions drawn on every chart:

- mAP@0.5 in percent; a *measured* figure (here, trained weights, COCO val2017 images)
  is drawn solid, a *published* one (models.toml, for models without trained weights
  here) hollow or hatched, with a legend saying so;
- GOps = 2 x GMACs counted by the analyzer over the whole exported graph (convolutions,
  fully-connected layers, element-wise ops, post-processing), i.e. GFLOPs; Darknet's
  "BFLOPs" count convolutions only and sit slightly lower (the table shows both);
- MParams = trainable parameters / 1e6 as the analyzer counts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from report.collect import MEASURED, PUBLISHED, ModelRow  # noqa: E402

GOPS_AXIS = "GOps = 2 × GMACs (all ops of the exported graph, analyzer)"
MAP50_AXIS = "mAP@0.5 (%)"
DPI = 110
_HATCH = "///"


def _family_colors(rows: list[ModelRow]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {fam: cmap(i % 10) for i, fam in enumerate(sorted({r.family or "?" for r in rows}))}


def _status_legend(color="0.35") -> list[Any]:
    return [Patch(facecolor=color, edgecolor="black", label="measured here (trained weights; N COCO images)"),
            Patch(facecolor="white", edgecolor=color, hatch=_HATCH, label="published (models.toml; no trained weights here)")]


def _footnote(fig, lines: list[str]) -> None:
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, color="0.3", va="bottom", ha="left", wrap=True)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _place_labels(ax, items: list[tuple[str, float, float]], fontsize: float = 8.5) -> None:
    """Annotate points, moving each label to the first nearby position that overlaps no label
    placed before it (greedy; enough for a dozen points)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed = []
    offsets = [(7, 5, "left"), (7, -13, "left"), (-7, 5, "right"), (-7, -13, "right"), (7, 17, "left"),
               (7, -25, "left"), (-7, 17, "right"), (-7, -25, "right"), (7, 29, "left"), (7, -37, "left")]
    for text, x, y in items:
        for dx, dy, ha in offsets:
            ann = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                              ha=ha, zorder=5)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.15)
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            ann.remove()
        else:  # every position taken: keep the first one, overlapping
            ann = ax.annotate(text, (x, y), fontsize=fontsize, xytext=offsets[0][:2], textcoords="offset points", zorder=5)
            placed.append(ann.get_window_extent(renderer))


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks as plain numbers (5, 10, 20, ...), with minor labels when the range is
    under two decades so that a narrow range still has readable ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    axis.set_major_formatter(fmt)
    lo, hi = axis.get_view_interval()
    if lo > 0 and hi / lo < 100:
        axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        axis.set_minor_formatter(fmt)


def _missing(rows: list[ModelRow], need: str, ok) -> list[str]:
    absent = [r.label for r in rows if not ok(r)]
    return [f"Not shown ({need}): " + ", ".join(absent)] if absent else []


def _bars(rows: list[ModelRow], path: Path, value, ylabel: str, title: str, need: str, fmt: str) -> list[dict]:
    """Bar chart of ``value(row)`` per network, hatched where the accuracy is published."""
    shown = [r for r in rows if value(r) is not None]
    data = [{"label": r.label, "value": float(value(r)), "status": r.map50.status, "family": r.family,
             "images": r.eval_images if r.map50.status == MEASURED else None} for r in shown]
    colors = _family_colors(rows)
    fig, ax = plt.subplots(figsize=(11, 6.2))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.83, bottom=0.24)
    for i, (r, d) in enumerate(zip(shown, data)):
        c = colors[r.family or "?"]
        published = d["status"] == PUBLISHED
        ax.bar(i, d["value"], color="white" if published else c, edgecolor=c, hatch=_HATCH if published else None,
               linewidth=1.5)
        text = format(d["value"], fmt) + (f"\n{d['images']} img" if d["images"] else "")
        ax.annotate(text, (i, d["value"]), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_xticks(range(len(shown)), [d["label"] for d in data], rotation=35, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if data:
        ax.set_ylim(0, max(d["value"] for d in data) * 1.2)
    else:
        ax.text(0.5, 0.5, "nothing to draw yet", transform=ax.transAxes, ha="center", color="0.4")
    families = [Patch(color=c, label=f) for f, c in colors.items() if any(d["family"] == f for d in data)]
    ax.legend(handles=_status_legend() + families, loc="lower center", bbox_to_anchor=(0.5, 1.01), fontsize=8,
              ncol=4, frameon=False)
    _footnote(fig, _missing(rows, need, lambda r: value(r) is not None))
    _save(fig, path)
    return data


def map50_per_network(rows: list[ModelRow], path: Path) -> list[dict]:
    """mAP@0.5 (%) per network. Returns ``[{"label", "value", "status", "family", "images"}]`` in
    drawing order (``images``: COCO images behind a measured figure, None for a published one)."""
    return _bars(rows, path, lambda r: r.map50.value if r.map50 else None, MAP50_AXIS,
                 "mAP@0.5 per network", "no mAP@0.5 measured or published", ".1f")


def map50_per_mparam_per_network(rows: list[ModelRow], path: Path) -> list[dict]:
    """mAP@0.5 (%) / MParams per network (``value`` = map50 % / (params / 1e6))."""
    return _bars(rows, path, lambda r: r.map50_per_mparam, "mAP@0.5 (%) per million parameters",
                 "mAP@0.5 per million parameters, per network", "no mAP@0.5 or not profiled", ".2f")


def map50_per_gops_per_network(rows: list[ModelRow], path: Path) -> list[dict]:
    """mAP@0.5 (%) / GOps per network (``value`` = map50 % / (2 x MACs / 1e9))."""
    return _bars(rows, path, lambda r: r.map50_per_gops, f"mAP@0.5 (%) per GOps\n[{GOPS_AXIS}]",
                 "mAP@0.5 per GOps, per network", "no mAP@0.5 or not profiled", ".2f")


def map50_per_mparam_vs_gops(rows: list[ModelRow], path: Path) -> list[dict]:
    """Scatter: x = GOps, y = mAP@0.5 per MParam, marker area proportional to MParams.

    Returns ``[{"label", "gops", "map50_per_mparam", "mparams", "status", "family"}]``.
    """
    shown = [r for r in rows if r.map50_per_mparam is not None and r.gops is not None]
    data = [{"label": r.label, "gops": r.gops, "map50_per_mparam": r.map50_per_mparam, "mparams": r.mparams,
             "status": r.map50.status, "family": r.family} for r in shown]
    colors = _family_colors(rows)
    fig, ax = plt.subplots(figsize=(12, 7))
    # The marker-size key sits right of the axes: inside, it hid the largest network (faster-rcnn-vgg16).
    fig.subplots_adjust(left=0.07, right=0.86, top=0.92, bottom=0.16)
    scale = 14.0  # points^2 per MParam
    for r, d in zip(shown, data):
        c = colors[r.family or "?"]
        published = d["status"] == PUBLISHED
        ax.scatter(d["gops"], d["map50_per_mparam"], s=max(d["mparams"], 0.5) * scale,
                   facecolor="none" if published else c, edgecolor=c, hatch=_HATCH if published else None,
                   linewidth=1.8, alpha=0.85, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel(GOPS_AXIS + ", log scale")
    ax.set_ylabel("mAP@0.5 (%) per million parameters")
    ax.set_title("mAP@0.5 per million parameters vs operations (marker area ∝ MParams)", fontsize=12)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    if data:
        gops = [d["gops"] for d in data]
        ax.set_xlim(min(gops) / 1.6, max(gops) * 1.6)
        ax.set_ylim(0, max(d["map50_per_mparam"] for d in data) * 1.25)
        _plain_log_ticks(ax.xaxis)
        _place_labels(ax, [(d["label"], d["gops"], d["map50_per_mparam"]) for d in data])
    else:
        ax.text(0.5, 0.5, "nothing to draw yet", transform=ax.transAxes, ha="center", color="0.4")
    handles = [Line2D([], [], marker="o", ls="", markerfacecolor="0.35", markeredgecolor="0.35", markersize=9,
                      label="measured mAP (trained weights)"),
               Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="0.35", markersize=9,
                      label="published mAP (models.toml)")]
    handles += [Patch(color=c, label=f) for f, c in colors.items() if any(d["family"] == f for d in data)]
    first = ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=2)
    ax.add_artist(first)
    sizes = [Line2D([], [], marker="o", ls="", markerfacecolor="0.85", markeredgecolor="0.5",
                    markersize=(m * scale) ** 0.5, label=f"{m} MParams") for m in (10, 50)]
    ax.legend(handles=sizes, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8, labelspacing=2.2,
              borderpad=1.4, handletextpad=1.6, title="marker area", title_fontsize=8)
    _footnote(fig, _missing(rows, "no mAP@0.5, or not profiled", lambda r: r.map50_per_mparam is not None
                            and r.gops is not None))
    _save(fig, path)
    return data


def pareto_front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points not dominated by another one with lower-or-equal ``x`` and higher-or-equal ``y``
    (strictly better in one), ordered by ``x``."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front


PRECISION_MARKERS = {"float32": "o", "bf16": "s", "int8": "^"}


def pair_precision(row: ModelRow, provider: str) -> str:
    """What a (model, backend) pair computes in: the file's int8, else the backend's bf16, else float32."""
    if row.quantized:
        return row.precision if row.precision != "float32" else "int8"
    lat = row.latency.get(provider)
    return "bf16" if lat is not None and (lat.precision or "").lower() in ("bf16", "bfloat16") else "float32"


def accuracy_latency_points(rows: list[ModelRow]) -> tuple[list[dict], list[str]]:
    """Every (model, backend) pair with a p50 and an accuracy measured for that file on that
    backend (:meth:`ModelRow.accuracy_on`), and the pairs left out with the reason."""
    points, left_out = [], []
    for r in rows:
        for prov, lat in r.latency.items():
            acc, _, basis = r.accuracy_on(prov)
            if acc is None:
                left_out.append(f"{r.label} on {prov}: {basis}")
                continue
            points.append({"id": f"{r.label} on {prov}", "label": r.label, "backend": prov,
                           "latency_ms": lat.p50_ms, "map50": acc.value, "status": acc.status, "basis": basis,
                           "precision": pair_precision(r, prov), "family": r.family,
                           "valid": lat.verdict != "INVALID", "parity": lat.parity_verdict})
    return points, left_out


def published_points(rows: list[ModelRow]) -> list[dict]:
    """The published layer: a float row's published mAP@0.5 (models.toml) at its measured float32
    p50 on onnxruntime cpu; drawn apart and never part of the measured front."""
    out = []
    for r in rows:
        pub = r.published_accuracy()
        lat = r.latency.get("cpu")
        if pub is None or lat is None or r.quantized or pair_precision(r, "cpu") != "float32":
            continue
        out.append({"id": f"{r.label} (published)", "label": r.label, "backend": "cpu", "latency_ms": lat.p50_ms,
                    "map50": pub.value, "status": PUBLISHED, "source": pub.source, "precision": "float32",
                    "valid": lat.verdict != "INVALID"})
    return out


def accuracy_vs_latency(rows: list[ModelRow], path: Path) -> dict[str, Any]:
    """x = measured p50 latency (ms, batch 1), y = mAP@0.5 MEASURED for that (file, backend) pair,
    with the Pareto front over those pairs whose p50 is VALID (no other such pair is both faster
    and more accurate).

    Colour = backend, marker = precision (float32 circle, bf16 square, int8 triangle), a cross
    over the point = p50 INVALID (runtime.stats; off the front). A pair's accuracy is its own
    backend's evaluation of its file, nothing else; pairs without one are left out, and said so.
    Published float accuracies form a separate, hollow, grey layer at the float model's measured
    cpu p50: marked published, never joined to the front.

    Returns ``{"points": [{"id", "label", "backend", "latency_ms", "map50", "status", "basis",
    "precision", "valid", "parity"}], "pareto": [ids by latency], "published": [{"id", "label",
    "latency_ms", "map50", "source"}], "left_out": [reasons], "per_backend": {backend: {"points":
    [...], "pareto": [labels by latency]}}}``.
    """
    from report.collect import provider_skips

    points, left_out = accuracy_latency_points(rows)
    published = published_points(rows)
    front = pareto_front([p for p in points if p["valid"]], "latency_ms", "map50")
    per_backend: dict[str, dict] = {}
    for prov in sorted({p["backend"] for p in points}, key=lambda p: (p != "cpu", p)):
        mine = [p for p in points if p["backend"] == prov]
        per_backend[prov] = {"points": mine, "pareto": [p["label"] for p in pareto_front(
            [p for p in mine if p["valid"]], "latency_ms", "map50")]}
    result = {"points": points, "pareto": [p["id"] for p in front], "published": published, "left_out": left_out,
              "per_backend": per_backend}

    cmap = plt.get_cmap("tab10")
    colors = {b: cmap(i % 10) for i, b in enumerate(per_backend)}
    fig, ax = plt.subplots(figsize=(13, 7.5))
    fig.subplots_adjust(left=0.07, right=0.78, top=0.9, bottom=0.2)
    for p in points:
        c = colors[p["backend"]]
        ax.scatter(p["latency_ms"], p["map50"], s=70, marker=PRECISION_MARKERS.get(p["precision"], "o"),
                   facecolor="none" if p["status"] == PUBLISHED else c, edgecolor=c, linewidth=1.8, zorder=3)
        if not p["valid"]:
            ax.scatter(p["latency_ms"], p["map50"], s=40, marker="x", color="black", linewidth=1, zorder=4)
    for p in published:
        ax.scatter(p["latency_ms"], p["map50"], s=55, marker="D", facecolor="none", edgecolor="0.55",
                   linewidth=1.2, linestyle=":", zorder=2)
    if front:
        ax.step([p["latency_ms"] for p in front], [p["map50"] for p in front], where="post", color="crimson",
                lw=1.3, ls="--", zorder=2)
        _place_labels(ax, [(p["id"], p["latency_ms"], p["map50"]) for p in front], fontsize=7.5)
    ax.set_xscale("log")
    drawn = points + published
    if drawn:
        lats = [p["latency_ms"] for p in drawn]
        ax.set_xlim(min(lats) / 1.6, max(lats) * 1.6)
        ax.set_ylim(min(p["map50"] for p in drawn) - 5, max(p["map50"] for p in drawn) + 5)
        _plain_log_ticks(ax.xaxis)
    else:
        ax.text(0.5, 0.5, "no latency with an applicable accuracy yet", transform=ax.transAxes, ha="center",
                color="0.4")
    ax.set_xlabel("p50 latency (ms, batch 1, log scale; measured on each backend)")
    ax.set_ylabel(MAP50_AXIS)
    ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], marker="o", ls="", color=colors[b], label=f"backend {b}") for b in per_backend]
    handles += [Line2D([], [], marker=m, ls="", markerfacecolor="0.35", markeredgecolor="0.35", label=prec)
                for prec, m in PRECISION_MARKERS.items()]
    handles += [Line2D([], [], marker="o", ls="", markerfacecolor="0.35", markeredgecolor="0.35",
                       label="mAP measured for that file on that backend"),
                Line2D([], [], marker="D", ls="", markerfacecolor="none", markeredgecolor="0.55",
                       label="published mAP (float model, models.toml) at its cpu p50: not measured, not on the front"),
                Line2D([], [], marker="x", ls="", color="black", label="p50 INVALID (see table; off the front)"),
                Line2D([], [], color="crimson", ls="--", label="Pareto front, measured pairs with VALID p50")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("mAP@0.5 vs measured p50 latency, every (model, backend) pair", fontsize=12)
    notes = [f"{p} not measured: {' '.join(why.split())}"[:170] for p, why in provider_skips(rows).items()][:3]
    if left_out:
        notes.append(("Left out (accuracy not measured for that file on that backend): " + "; ".join(left_out))[:400])
    _footnote(fig, notes)
    _save(fig, path)
    return result


def _size_groups(rows: list[ModelRow]) -> list[list[ModelRow]]:
    """Rows that are the same network (family, parameter count and precision) at two or more input sizes."""
    groups: dict[tuple, list[ModelRow]] = {}
    for r in rows:
        if r.params is not None and r.gops is not None:
            groups.setdefault((r.family, r.params, r.precision), []).append(r)
    out = [sorted(g, key=lambda r: r.input_size[0] * r.input_size[1]) for g in groups.values()
           if len({r.input_size for r in g}) >= 2]
    return sorted(out, key=lambda g: (g[0].family, g[0].params, g[0].precision))


def input_size_scaling(rows: list[ModelRow], path: Path) -> list[dict]:
    """GOps, latency and mAP@0.5 against input size for every network measured at 2+ sizes
    (e.g. YOLOv3 at 320 / 416 / 608): the diminishing-returns point, with measured cost.

    Returns ``[{"family", "params", "points": [{"label", "input_size", "megapixels", "gops",
    "latency_ms": {provider: p50}, "map50", "map50_status"}]}]``.
    """
    groups = _size_groups(rows)
    result = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.2, wspace=0.28)
    markers = "osD^v<>"
    for gi, group in enumerate(groups):
        points = [{"label": r.label, "input_size": list(r.input_size),
                   "megapixels": r.input_size[0] * r.input_size[1] / 1e6, "gops": r.gops,
                   "latency_ms": {p: lat.p50_ms for p, lat in r.latency.items()},
                   "map50": r.map50.value if r.map50 else None,
                   "map50_status": r.map50.status if r.map50 else None} for r in group]
        name = (f"{group[0].family} ({group[0].params / 1e6:.2f} MParams"
                + (f", {group[0].precision}" if group[0].quantized else "") + ")")
        result.append({"family": group[0].family, "params": group[0].params, "precision": group[0].precision,
                       "points": points})
        mk, colour = markers[gi % len(markers)], plt.get_cmap("tab10")(gi % 10)
        xs = [p["megapixels"] for p in points]
        axes[0].plot(xs, [p["gops"] for p in points], marker=mk, color=colour, label=name)
        provs = sorted({k for p in points for k in p["latency_ms"]}, key=lambda p: (p != "cpu", p))
        for prov, style in zip(provs, ("-", "--", ":", "-.") * 4):
            have = [p for p in points if prov in p["latency_ms"]]
            axes[1].plot([p["megapixels"] for p in have], [p["latency_ms"][prov] for p in have], marker=mk,
                         color=colour, ls=style, label=f"{name}, {prov}")
        have = [p for p in points if p["map50"] is not None]
        if have:
            axes[2].plot([p["megapixels"] for p in have], [p["map50"] for p in have], marker=mk, color=colour,
                         label=name)
            for p in have:
                if p["map50_status"] == PUBLISHED:
                    axes[2].plot(p["megapixels"], p["map50"], marker=mk, ls="", markersize=9,
                                 markerfacecolor="white", markeredgecolor=colour)
        for ax in axes:
            for p in points:
                ax.axvline(p["megapixels"], color="0.85", lw=0.8, zorder=0)
    for p in (p for g in result for p in g["points"]):
        axes[0].annotate(f"{p['input_size'][0]}x{p['input_size'][1]}", (p["megapixels"], p["gops"]),
                         fontsize=8, xytext=(4, -12), textcoords="offset points")
    titles = ("operations (analyzer)", "latency p50 (measured, batch 1)",
              "mAP@0.5 (filled = measured, hollow = published)")
    ylabels = ("GOps = 2 × GMACs", "p50 latency (ms)", MAP50_AXIS)
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("input size (megapixels, H × W / 1e6)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5)
        else:
            ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", color="0.4")
    fig.suptitle("Cost and accuracy against input size (same network, several input sizes)", fontsize=12)
    if not groups:
        _footnote(fig, ["No network has been profiled at two or more input sizes yet."])
    _save(fig, path)
    return result


def op_type_times(nodes: dict[str, Any] | None) -> dict[str, float]:
    """Milliseconds per op type from a bench record's ``nodes`` block (empty when absent)."""
    if not nodes:
        return {}
    by_op = nodes.get("by_op") or nodes.get("op_types") or {}
    out = {}
    for op, entry in by_op.items():
        if isinstance(entry, dict):
            ms = entry.get("ms", entry.get("time_ms", entry.get("total_ms")))
            if ms is None and "us" in entry:
                ms = entry["us"] / 1000.0
        else:
            ms = entry
        if ms is not None:
            out[op] = float(ms)
    return out


def time_per_op_type(rows: list[ModelRow], path: Path, top: int = 8) -> dict[str, dict[str, dict[str, float]]]:
    """Per provider, a 100 % stacked horizontal bar per model: the share of node time by op
    type, from the backend's per-layer profile (``bench --nodes``: onnxruntime's node profiling,
    OpenVINO's performance counters, whose layers are attributed to the ONNX op types they
    came from, "X (added by OpenVINO)" otherwise), total ms written beside it.
    The ``top`` op types by mean share get their own colour, the rest is summed as "other".

    Returns ``{provider: {label: {op_type: ms}}}`` (all op types, before grouping).
    """
    from report.collect import providers as all_providers

    result: dict[str, dict[str, dict[str, float]]] = {}
    for prov in all_providers(rows):
        per_model = {r.label: op_type_times(r.latency[prov].nodes) for r in rows if prov in r.latency}
        per_model = {k: v for k, v in per_model.items() if v}
        if per_model:
            result[prov] = per_model
    n_bars = sum(len(v) for v in result.values()) or 3
    # Wide enough on the right for legend entries like "NonMaxSuppression (added by onnxruntime)".
    fig, axes = plt.subplots(max(len(result), 1), 1, squeeze=False, figsize=(14, 1.4 + 0.42 * n_bars + 0.9 * len(result)))
    fig.subplots_adjust(left=0.15, right=0.7, top=1 - 0.5 / fig.get_figheight(), bottom=0.7 / fig.get_figheight(),
                        hspace=0.6)
    cmap = plt.get_cmap("tab10")
    for ax, (prov, per_model) in zip(axes[:, 0], result.items()):
        totals: dict[str, float] = {}
        for times in per_model.values():
            total = sum(times.values())
            for op, ms in times.items():  # rank op types by their mean share, so small models count too
                totals[op] = totals.get(op, 0.0) + ms / total
        keep = sorted(totals, key=totals.get, reverse=True)[:top]
        labels = list(per_model)
        model_total = [sum(per_model[m].values()) for m in labels]
        left = [0.0] * len(labels)
        for i, op in enumerate(keep + ["other"]):
            ms = [(per_model[m].get(op, 0.0) if op != "other" else
                   sum(v for o, v in per_model[m].items() if o not in keep)) for m in labels]
            widths = [100.0 * v / t for v, t in zip(ms, model_total)]
            ax.barh(labels, widths, left=left, color=cmap(i % 10) if op != "other" else "0.75", label=op)
            left = [a + b for a, b in zip(left, widths)]
        for y, t in enumerate(model_total):
            ax.annotate(f"{t:.1f} ms", (100, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"share of layer time on {prov} (%; the backend's per-layer profile summed per ONNX op type: "
                      "onnxruntime node profiling or OpenVINO performance counters; total ms per inference at right)",
                      fontsize=8.5)
        ax.set_title(f"where the time goes: {prov}", fontsize=11)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.08, 0.5))
        ax.grid(axis="x", alpha=0.3)
    if not result:
        axes[0][0].text(0.5, 0.5, "no bench record with node profiling yet (python cli.py bench --nodes)",
                        transform=axes[0][0].transAxes, ha="center", color="0.4")
        axes[0][0].set_axis_off()
    _save(fig, path)
    return result
