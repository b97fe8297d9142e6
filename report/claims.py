"""The seed paper's two claims, tested against the measurements, with the verdict in words.

(a) "Only diminishing returns in accuracy come from more operations on the same architecture
(YOLOv3)." Evidence: one network (same family, parameters and precision) evaluated here at
several input sizes. Between consecutive sizes, the gain in mAP@0.5 per extra GOps; the claim
holds when that gain never grows from one step to the next. The published figures of the
same family at several sizes are put beside it, worked out the same way.

(b) "Two-stage detectors spend compute per proposal; one-stage compute is constant whatever
the image." Evidence: the ``images`` records (operations actually executed on each image, the
analyzer's measured-shapes mode, and its latency). A model is two-stage when its graph holds
an RoI operator (RoiAlign / MaxRoiPool: compute indexed by proposals), a structural fact read
from the profile, not from the per-image counts being judged. The claim holds when every
two-stage model's network operations vary over the images and every one-stage model's do not
(relative spread, (max - min) / median, against :data:`CONSTANT_SPREAD`).

The words are generated from the numbers: with other measurements they say otherwise.
GOps = 2 x MACs / 1e9 (1 MAC = 2 FLOPs).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from report.charts import GOPS_AXIS, MAP50_AXIS, _footnote, _plain_log_ticks, _save, plt
from report.collect import MEASURED, PUBLISHED, ModelRow

ROI_OPS = ("RoiAlign", "MaxRoiPool")
# A network whose operations move by less than this fraction of their median over the images
# is "constant": a one-stage network's count does not move at all (0 %), a two-stage head's moves
# with the proposals by whole RoIs (several %), so the bound sits far from both.
CONSTANT_SPREAD = 0.005


def _fmt_size(row: ModelRow) -> str:
    return f"{row.input_size[0]}x{row.input_size[1]}"


# --------------------------------------------------------------------------- claim (a)

def _steps(points: list[dict]) -> list[dict]:
    out = []
    for a, b in zip(points, points[1:]):
        d_gops = b["gops"] - a["gops"]
        d_map = b["map50"] - a["map50"]
        out.append({"from": a["size"], "to": b["size"], "d_gops": d_gops, "d_map50": d_map,
                    "gain_per_gops": d_map / d_gops if d_gops else None})
    return out


def _series(group: list[ModelRow], status: str) -> list[dict]:
    by_size: dict[str, dict] = {}
    # Two registry entries can be the same network at the same size (e.g. a model registered at
    # 608 and its smaller sibling run at 608): one point per size, the larger evaluation.
    for r in group:
        if r.map50 is None or r.map50.status != status or r.gops is None:
            continue
        p = {"label": r.label, "size": _fmt_size(r), "gops": r.gops, "map50": r.map50.value,
             "latency_ms": r.latency["cpu"].p50_ms if "cpu" in r.latency else None,
             "latency_valid": r.latency["cpu"].verdict != "INVALID" if "cpu" in r.latency else None,
             "images": r.eval_images if status == MEASURED else None, "source": r.map50.source}
        if p["size"] not in by_size or (p["images"] or 0) > (by_size[p["size"]]["images"] or 0):
            by_size[p["size"]] = p
    return sorted(by_size.values(), key=lambda p: p["gops"])


def _judge(steps: list[dict]) -> tuple[str, int | None]:
    """("supported" | "contradicted" | "undecided", index of the first step whose gain grew)."""
    gains = [s["gain_per_gops"] for s in steps if s["gain_per_gops"] is not None]
    if len(gains) < 2:
        return "undecided", None
    for i, (a, b) in enumerate(zip(gains, gains[1:]), 1):
        if b > a:
            return "contradicted", i
    return "supported", None


def diminishing_returns_data(rows: list[ModelRow]) -> dict[str, Any]:
    """Per family with a float network measured at 2+ sizes: the measured series (points by
    GOps, steps with the gain per extra GOps), the published series of the same family, the
    verdict, and ``text`` (the paragraph). ``verdict`` overall: "supported" when every measured
    series supports it, "contradicted" when one contradicts it, else "undecided"."""
    groups: dict[tuple, list[ModelRow]] = {}
    for r in rows:
        if r.params is not None and r.gops is not None and not r.quantized:
            groups.setdefault((r.family, r.params), []).append(r)
    families: dict[str, dict[str, Any]] = {}
    for (family, params), group in groups.items():
        measured = _series(group, MEASURED)
        if len({p["size"] for p in measured}) >= 2:
            fam = families.setdefault(family, {"family": family, "measured": [], "published": []})
            steps = _steps(measured)
            verdict, at = _judge(steps)
            fam["measured"].append({"network": measured[0]["label"].split(" @")[0], "params": params,
                                    "points": measured, "steps": steps, "verdict": verdict, "grew_at": at})
    for (family, params), group in groups.items():
        if family in families:
            published = _series(group, PUBLISHED)
            if len(published) >= 2:
                fam = families[family]
                fam["published"].append({"network": f"{family} {params / 1e6:.1f} MParams", "params": params,
                                         "points": published, "steps": _steps(published),
                                         "verdict": _judge(_steps(published))[0]})
    verdicts = [s["verdict"] for f in families.values() for s in f["measured"]]
    overall = ("contradicted" if "contradicted" in verdicts else "supported" if "supported" in verdicts
               else "undecided")
    return {"families": list(families.values()), "verdict": overall, "text": _text_a(list(families.values()), overall)}


def _describe_series(s: dict, measured: bool) -> str:
    pts = ", ".join(f"{p['map50']:.1f} % at {p['size']} ({p['gops']:.2f} GOps"
                    + (f", {p['latency_ms']:.1f} ms p50 on cpu" + ("" if p.get("latency_valid") else " (INVALID)")
                       if p.get("latency_ms") is not None else "") + ")"
                    for p in s["points"])
    steps = ", ".join(f"{st['from']}→{st['to']}: {st['d_map50']:+.2f} points for {st['d_gops']:+.2f} GOps = "
                      f"{st['gain_per_gops']:+.3f} points/GOps" for st in s["steps"] if st["gain_per_gops"] is not None)
    images = {p["images"] for p in s["points"] if p.get("images")}
    where = (f" on {'/'.join(str(i) for i in sorted(images))} COCO val2017 images" if measured and images
             else " (published, models.toml)" if not measured else "")
    return f"{s['network']} mAP@0.5{where}: {pts}. Gain per extra GOps between consecutive sizes: {steps}."


def _text_a(families: list[dict], overall: str) -> str:
    if not families:
        return ("Not testable yet: no network has a measured mAP@0.5 at two or more input sizes "
                "(python cli.py run evaluates the trained Darknet model at several sizes).")
    parts = []
    for fam in families:
        for s in fam["measured"]:
            parts.append("Measured: " + _describe_series(s, True))
            if s["verdict"] == "supported":
                parts.append("The gain per extra GOps falls at every step: these measurements support the claim "
                             "of diminishing returns.")
            elif s["verdict"] == "contradicted":
                a, b = s["steps"][s["grew_at"] - 1], s["steps"][s["grew_at"]]
                parts.append(f"The gain per extra GOps grows from {a['gain_per_gops']:+.3f} ({a['from']}→{a['to']}) to "
                             f"{b['gain_per_gops']:+.3f} ({b['from']}→{b['to']}): these measurements do not support "
                             "the claim of only diminishing returns.")
            else:
                parts.append("One step only: a trend needs three sizes or more, so these measurements neither "
                             "support nor contradict the claim.")
        for s in fam["published"]:
            trend = {"supported": "falls at every step (diminishing returns)",
                     "contradicted": "grows at some step", "undecided": "cannot show a trend (one step)"}[s["verdict"]]
            parts.append("Published, for comparison: " + _describe_series(s, False) + f" The published gain {trend}.")
    return " ".join(parts)


def diminishing_returns(rows: list[ModelRow], path: Path) -> dict[str, Any]:
    """Chart of claim (a): mAP@0.5 against GOps; measured series solid with filled markers,
    published series dashed with hollow markers, each step annotated with its gain per GOps.
    Returns :func:`diminishing_returns_data`."""
    data = diminishing_returns_data(rows)
    fig, ax = plt.subplots(figsize=(12, 6.8))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.2)
    cmap = plt.get_cmap("tab10")
    i = 0
    for fam in data["families"]:
        for kind, series_list in (("measured", fam["measured"]), ("published", fam["published"])):
            for s in series_list:
                c = cmap(i % 10)
                i += 1
                xs, ys = [p["gops"] for p in s["points"]], [p["map50"] for p in s["points"]]
                ax.plot(xs, ys, ls="-" if kind == "measured" else "--", color=c, marker="o", markersize=8,
                        markerfacecolor=c if kind == "measured" else "white", markeredgecolor=c,
                        label=f"{s['network']}: {kind}")
                for p in s["points"]:
                    ax.annotate(p["size"], (p["gops"], p["map50"]), fontsize=8, xytext=(5, -12),
                                textcoords="offset points")
                for st, a, b in zip(s["steps"], s["points"], s["points"][1:]):
                    if st["gain_per_gops"] is not None:
                        ax.annotate(f"{st['gain_per_gops']:+.2f} pt/GOps", ((a["gops"] + b["gops"]) / 2,
                                    (a["map50"] + b["map50"]) / 2), fontsize=7.5, color=c, xytext=(0, 6),
                                    textcoords="offset points", ha="center")
    ax.set_xlabel(GOPS_AXIS)
    ax.set_ylabel(MAP50_AXIS)
    ax.grid(alpha=0.3)
    if i:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no network measured at two or more input sizes yet", transform=ax.transAxes,
                ha="center", color="0.4")
    ax.set_title(f"Claim: only diminishing returns from more operations on the same architecture — "
                 f"{data['verdict']} by these measurements", fontsize=11)
    _footnote(fig, ["Filled markers, solid line: mAP@0.5 measured here (trained weights, COCO val2017). Hollow "
                    "markers, dashed: published (models.toml). Annotations: mAP@0.5 points gained per extra GOps "
                    "between consecutive input sizes."])
    _save(fig, path)
    return data


# --------------------------------------------------------------------------- claim (b)

def _summary(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {"min": min(values), "median": med, "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0}


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


def stage_of(row: ModelRow) -> str | None:
    """"two-stage" when the graph holds an RoI operator, "one-stage" when the profile lists op
    types and none is one, None without a profile."""
    if not row.by_op:
        return None
    return "two-stage" if any(op in row.by_op for op in ROI_OPS) else "one-stage"


def per_image_data(rows: list[ModelRow]) -> dict[str, Any]:
    """Per model with an ``images`` record: per-image GOps (total and network), latency and
    detections, their min/median/max and relative spread, Pearson r of latency against
    detections; the verdict on claim (b) and ``text``."""
    models = []
    for r in rows:
        imgs = (r.images or {}).get("images") or []
        if not imgs:
            continue
        gops = [2.0 * float(i["macs"]) / 1e9 for i in imgs]
        net = [2.0 * float(i.get("network_macs", i["macs"])) / 1e9 for i in imgs]
        lat = [float(i["latency_ms"]) for i in imgs if i.get("latency_ms") is not None]
        dets = [int(i.get("detections", 0)) for i in imgs]
        stage = stage_of(r)
        net_s = _summary(net)
        models.append({"label": r.label, "stage": stage, "n": len(imgs), "gops_per_image": gops,
                       "network_gops_per_image": net, "latency_per_image": lat, "detections_per_image": dets,
                       "gops": _summary(gops), "network_gops": net_s, "latency_ms": _summary(lat) if lat else None,
                       "r_latency_detections": _pearson(dets[:len(lat)], lat) if len(lat) == len(dets) else None,
                       "constant": net_s["spread"] < CONSTANT_SPREAD,
                       "backend": "cpu", "note": (r.images or {}).get("note", "")})
    expected = {"two-stage": False, "one-stage": True}
    judged = [m for m in models if m["stage"] in expected]
    against = [m for m in judged if m["constant"] != expected[m["stage"]]]
    stages = {m["stage"] for m in judged}
    if against:
        verdict = "contradicted"
    elif stages == {"one-stage", "two-stage"}:
        verdict = "supported"
    else:
        verdict = "undecided"
    return {"models": models, "verdict": verdict, "against": [m["label"] for m in against],
            "constant_spread": CONSTANT_SPREAD, "text": _text_b(models, verdict, against, stages)}


def _text_b(models: list[dict], verdict: str, against: list[dict], stages: set[str]) -> str:
    if not models:
        return ("Not testable yet: no per-image operation counts recorded (python cli.py run counts the operations "
                "executed on each evaluated image).")
    parts = []
    for m in models:
        g, n = m["gops"], m["network_gops"]
        kind = {"two-stage": "two-stage (RoI operator in the graph)", "one-stage": "one-stage (no RoI operator)",
                None: "stage unknown (no profile)"}[m["stage"]]
        s = (f"{m['label']}, {kind}, over {m['n']} images: GOps per image min {g['min']:.3f} / median "
             f"{g['median']:.3f} / max {g['max']:.3f} (spread {100 * g['spread']:.2f} % of the median; network "
             f"without post-processing {100 * n['spread']:.2f} %)")
        if m["latency_ms"]:
            lt = m["latency_ms"]
            s += (f"; latency on cpu min {lt['min']:.1f} / median {lt['median']:.1f} / max {lt['max']:.1f} ms "
                  f"(spread {100 * lt['spread']:.1f} %)")
        if m["r_latency_detections"] is not None:
            s += f"; Pearson r of latency with detections {m['r_latency_detections']:+.2f}"
        parts.append(s + ".")
    bound = f"{100 * CONSTANT_SPREAD:g} %"
    if verdict == "supported":
        parts.append(f"Every two-stage model's network operations vary with the image (spread above {bound}) and "
                     f"every one-stage model's stay constant (below {bound}): the measurements support the claim.")
    elif verdict == "contradicted":
        which = "; ".join(f"{m['label']} ({m['stage']}, network spread {100 * m['network_gops']['spread']:.2f} %)"
                          for m in against)
        parts.append(f"Against the claim (constant = network spread below {bound}): {which}. The measurements do "
                     "not support the claim as stated.")
    else:
        have = (f"only {' and '.join(sorted(stages))} models have" if stages else
                "no model of known stage (a profile listing its op types) has")
        parts.append(f"So far {have} per-image counts: the comparison the claim makes cannot be made yet "
                     "(neither supported nor contradicted).")
    return " ".join(parts)


def per_image_cost(rows: list[ModelRow], path: Path) -> dict[str, Any]:
    """Chart of claim (b): per model, box plots of per-image GOps and of per-image latency (cpu),
    and latency against the number of detections. Returns :func:`per_image_data`."""
    data = per_image_data(rows)
    models = data["models"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.4))
    fig.subplots_adjust(left=0.05, right=0.98, top=0.86, bottom=0.3, wspace=0.28)
    labels = [m["label"] + (" (2-stage)" if m["stage"] == "two-stage" else "") for m in models]
    if models:
        axes[0].boxplot([m["gops_per_image"] for m in models], showfliers=True)
        axes[0].set_xticks(range(1, len(models) + 1), labels, rotation=35, ha="right", fontsize=8)
        axes[0].set_yscale("log")
        have = [m for m in models if m["latency_per_image"]]
        axes[1].boxplot([m["latency_per_image"] for m in have], showfliers=True)
        axes[1].set_xticks(range(1, len(have) + 1), [labels[models.index(m)] for m in have], rotation=35, ha="right",
                           fontsize=8)
        axes[1].set_yscale("log")
        cmap = plt.get_cmap("tab10")
        for i, m in enumerate(have):
            axes[2].scatter(m["detections_per_image"][:len(m["latency_per_image"])], m["latency_per_image"], s=14,
                            color=cmap(i % 10), alpha=0.7, label=m["label"])
        axes[2].set_yscale("log")
        axes[2].legend(fontsize=7.5)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no per-image record yet", transform=ax.transAxes, ha="center", color="0.4")
    axes[0].set_ylabel("GOps per image = 2 × MACs executed / 1e9 (log)")
    axes[0].set_title("operations executed per image (measured shapes)", fontsize=10)
    axes[1].set_ylabel("latency per image (ms, onnxruntime cpu, log)")
    axes[1].set_title("latency per image (measured, one run each)", fontsize=10)
    axes[2].set_xlabel("detections returned for the image")
    axes[2].set_ylabel("latency (ms, cpu, log)")
    axes[2].set_title("latency against detections", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        if models:
            _plain_log_ticks(ax.yaxis)
    fig.suptitle(f"Claim: two-stage compute grows per proposal, one-stage is constant — {data['verdict']} by these "
                 "measurements", fontsize=11)
    _footnote(fig, ["Per image of each model's `images` record: MACs counted by the analyzer with the shapes that "
                    "occurred on that image (1 MAC = 2 FLOPs), latency of one float32 onnxruntime cpu run; these "
                    "single runs are not VALID latency figures (see the latency table)."])
    _save(fig, path)
    return data

