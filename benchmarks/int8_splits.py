"""INT8 accuracy on images the recipe never saw, over several disjoint splits.

For each split seed the COCO folder is split into 16 calibration / 32 selection / the rest
evaluation images (``quantization.splits``), and two INT8 files are made with the default
recipe (entropy calibration, per-channel, QDQ) on that split's calibration images:

- ``all INT8``: every quantizable layer in INT8 (no choice made on accuracy);
- ``max-drop B``: ``quantize --max-drop B`` (layers kept float by the stop rule of
  ``quantization.budget``, chosen on the selection images). When the all-INT8 file already
  passes the rule on the selection images it is that very file, evaluated once.

Float32 and each INT8 file are then evaluated (onnxruntime CPU) on the split's evaluation
images only (``eval`` refuses the others), and the change INT8 - float32 is given with its
95 % paired bootstrap interval over those images (``eval.bootstrap``), for mAP@0.5 and
mAP@[.5:.95], with the mean and standard deviation of the change over splits.

    python cli.py export yolov3-tiny           # official weights from ../shared/data/darknet
    python benchmarks/int8_splits.py results/onnx/yolov3-tiny.onnx --seeds 0 1 2 --max-drop 0.3
    python benchmarks/int8_splits.py MODEL --out-dir DIR --json F   # keep the INT8 files, write the figures

Measured 2026-12-07 (yolov3-tiny official weights, Intel Xeon with avx512_vnni/AMX, 8-bit weights,
seeds 0 1 2, budget 0.3, 436 s at load 7-8): the all-INT8 file passed the rule on every split
(selection drops 3.39, 1.63, 4.16 mAP@0.5 points, within the noise of 32 images), so the --max-drop
file is the all-INT8 file with no layer kept float. On the 96 evaluation images, INT8 - float32:
mAP@0.5 +1.22 [-0.00, +2.77], +0.02 [-2.56, +1.75], +0.10 [-1.62, +1.30] (mean +0.44, sd 0.67);
mAP@[.5:.95] +0.37 [-0.40, +0.90], -0.23 [-1.33, +0.49], -0.14 [-1.29, +0.65] (mean -0.00, sd 0.32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(model: Path, coco: Path, seeds: list[int], max_drop: float, out_dir: Path, resamples: int, threads: int | None,
        say) -> dict:
    from eval.bootstrap import paired_change
    from eval.coco import evaluate_model
    from eval.dataset import load_coco
    from quantization.quantize import QuantizeSettings, layer_macs, quantizable_layers, quantize_model
    from quantization.budget import RULE, BudgetSettings, quantize_within_budget
    from quantization.splits import split_ids

    dataset = load_coco(coco)
    layers = [name for name, _ in quantizable_layers(model)]
    macs = layer_macs(model, layers)
    total_macs = sum(macs.values())

    def evaluate(path: Path, ids, stem: str) -> list[dict]:
        result = evaluate_model(path, coco_dir=coco, image_ids=tuple(ids), store=False, threads=threads,
                                results_file=out_dir / f"{stem}.results.json", cache_file=out_dir / f"{stem}.cache.jsonl")
        return json.loads(Path(result.results_file).read_text())

    say("float32 on every image (each split's evaluation images are a subset)")
    float_results = evaluate(model, sorted(dataset.images), "float32")
    rows = []
    for seed in seeds:
        split = split_ids(dataset.images, seed)
        say(f"seed {seed}: {split.describe()}")
        started = time.perf_counter()
        recipe = QuantizeSettings(out=out_dir / f"seed{seed}-maxdrop@int8.onnx")  # the default recipe
        budget = quantize_within_budget(model, BudgetSettings(max_drop=max_drop, coco_dir=coco, seed=seed,
                                                              quantize=recipe),
                                        progress=lambda m, s=seed: say(f"seed {s}: {m}"))
        budget_seconds = time.perf_counter() - started
        files = {}
        if budget.kept_float:
            all_path = out_dir / f"seed{seed}-all@int8.onnx"
            quantize_model(model, QuantizeSettings(calibration=coco, image_ids=split.calibration, out=all_path))
            files["all INT8"] = all_path
            files[f"max-drop {max_drop:g}"] = budget.path
        else:
            files[f"all INT8 = max-drop {max_drop:g}"] = budget.path
        for label, path in files.items():
            say(f"seed {seed}: evaluating {label} on {len(split.evaluation)} evaluation images")
            int8_results = evaluate(path, split.evaluation, f"seed{seed}-{path.stem}")
            changes = paired_change(float_results, int8_results, dataset, split.evaluation, resamples=resamples)
            kept = budget.kept_float if path == budget.path else []
            rows.append({
                "seed": seed, "file": label, "path": str(path), "evaluation_images": len(split.evaluation),
                "kept_float": kept, "kept_float_macs_fraction": sum(macs.get(n, 0) for n in kept) / max(total_macs, 1),
                "selection_drop": budget.drop if path == budget.path else budget.all_int8_drop,
                "selection_changes": {m: c.to_dict() for m, c in budget.changes.items()} if path == budget.path else None,
                "budget_seconds": round(budget_seconds, 1),
                "selection_steps": budget.steps if path == budget.path else None,
                "changes": {m: c.to_dict() for m, c in changes.items()},
            })
    summary = {}
    for kind in ("all INT8", "max-drop"):
        picked = [r for r in rows if kind in r["file"]]
        for metric in ("map50", "map"):
            values = [r["changes"][metric]["delta"] for r in picked]
            summary[f"{kind} {metric}"] = {"mean": statistics.fmean(values) if values else None,
                                           "sd": statistics.stdev(values) if len(values) > 1 else None,
                                           "values": values}
    return {"model": str(model), "coco": str(coco), "max_drop": max_drop, "rule": RULE, "resamples": resamples,
            "layers": len(layers), "rows": rows, "summary": summary}


def render(report: dict) -> str:
    def change(c: dict) -> str:
        return f"{c['b']:.2f} {c['delta']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"

    lines = [f"{report['model']}: INT8 - float32 on each split's evaluation images (onnxruntime CPU; 95 % paired "
             f"bootstrap, {report['resamples']} resamples). Budget rule: {report['rule']}.",
             f"{'seed':>4} | {'file':<24} | {'eval':>4} | {'float mAP@0.5':>13} | {'INT8 mAP@0.5, change [95%]':<28} | "
             f"{'float mAP':>9} | {'INT8 mAP@[.5:.95], change [95%]':<31} | sel. drop | kept float ({report['layers']} "
             "layers)"]
    for r in report["rows"]:
        c50, cm = r["changes"]["map50"], r["changes"]["map"]
        kept = ", ".join(r["kept_float"]) or "none"
        if r["kept_float"]:
            kept += f" ({100 * r['kept_float_macs_fraction']:.1f} % of MACs)"
        lines.append(f"{r['seed']:>4} | {r['file']:<24} | {r['evaluation_images']:>4} | {c50['a']:>13.2f} | "
                     f"{change(c50):<28} | {cm['a']:>9.2f} | {change(cm):<31} | {r['selection_drop']:>9.2f} | {kept}")
    for key, s in report["summary"].items():
        if s["values"]:
            sd = "-" if s["sd"] is None else f"{s['sd']:.2f}"
            lines.append(f"{key}: change mean {s['mean']:+.2f}, sd {sd} over {len(s['values'])} splits "
                         f"({', '.join(f'{v:+.2f}' for v in s['values'])})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="float32 export with trained weights")
    parser.add_argument("--coco", type=Path, default=None, help="default: the shared COCO val2017 subset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the INT8 files and results here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from quantization.budget import default_coco

    coco = args.coco or default_coco()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="int8-splits-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = run(args.model, coco, args.seeds, args.max_drop, out_dir, args.resamples, args.threads, say)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(render(report))
    print(f"wall time {report['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
