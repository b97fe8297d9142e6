"""How much an evaluation costs beyond the model itself: wall time vs time inside session.run.

    python benchmarks/eval_overhead.py MODEL [--coco DIR] [--runs 3] [--backend pycocotools]

MODEL is an exported .onnx file or a registered model name (exported once, with its
locally found weights, into a temporary folder). Each run is a complete, fresh
``eval.coco.evaluate_model`` call (no cache reuse, nothing written to the results
store). Printed per run and as medians (all measured, seconds):

- ``wall``: the whole call — metadata, session creation, the image loop, writing the
  results file, COCOeval scoring;
- ``loop``: the image loop alone (decode/resize in background workers, session.run,
  mapping boxes back, the detection cache);
- ``session``: the sum of time inside ``session.run``;
- ``wall/session`` and ``loop/session`` ratios (the issue's goal: <= 1.10 on CPU), images/s
  through the loop, and the time spent scoring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _model_path(model: str, workdir: Path) -> Path:
    if model.endswith(".onnx"):
        return Path(model)
    from exporters import export_model
    from exporters.registry import load_registry
    from exporters.weights import locate_weights

    spec = load_registry().get(model)
    return export_model(spec, workdir / f"{spec.name}.onnx", weights=locate_weights(spec)).path


def main(argv: list[str] | None = None) -> None:
    from eval.coco import evaluate_model
    from core.paths import data_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--coco", type=Path, default=None, help="default: $DETBENCH_DATA/coco-val2017-subset")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default="pycocotools")
    parser.add_argument("--resize", default=None, help="override the model's resize mode")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    coco = args.coco or data_dir() / "coco-val2017-subset"

    with tempfile.TemporaryDirectory(prefix="detbench-eval-overhead-") as tmp:
        work = Path(tmp)
        model = _model_path(args.model, work)
        runs = []
        for i in range(args.runs):
            r = evaluate_model(model, coco_dir=coco, provider=args.provider, backend=args.backend,
                               overrides={"resize": args.resize} if args.resize else None,
                               results_file=work / f"r{i}.json", cache_file=work / f"c{i}.jsonl",
                               workers=args.workers, prefetch=args.prefetch, threads=args.threads, store=False)
            row = {"wall": r.wall_seconds, "loop": r.loop_seconds, "session": r.session_seconds,
                   "score": r.score_seconds, "session_create": r.session_create_seconds,
                   "wall/session": r.overhead, "loop/session": r.loop_overhead, "images_per_s": r.images_per_second,
                   "images": r.images_evaluated, "map50": r.scores["map50"], "map": r.scores["map"]}
            runs.append(row)
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    medians = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    print(f"\n{r.model} ({r.contract['detbench.resize']}) on {r.provider}, {medians['images']:.0f} images, "
          f"scoring with {args.backend}; medians of {args.runs} runs (measured):")
    print(f"  whole evaluation {medians['wall']:.2f} s vs inside session.run {medians['session']:.2f} s "
          f"-> {medians['wall/session']:.3f} x")
    print(f"  image loop {medians['loop']:.2f} s -> {medians['loop/session']:.3f} x; "
          f"{medians['images_per_s']:.2f} images/s; scoring {medians['score']:.2f} s; "
          f"session creation {medians['session_create']:.2f} s")
    print(f"  mAP@0.5 {100 * medians['map50']:.2f}, mAP@[.5:.95] {100 * medians['map']:.2f} (COCO AP, points)")
    if args.json:
        args.json.write_text(json.dumps({"model": r.model, "backend": args.backend, "runs": runs, "medians": medians},
                                        indent=1))


if __name__ == "__main__":
    main()
