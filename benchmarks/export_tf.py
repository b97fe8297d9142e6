"""Export time, ONNX size, peak memory and TF-vs-ONNX parity of the TensorFlow SSD exports.

Each run is a fresh child process (so the peak RSS is that export's own, and no
TensorFlow state is shared between runs); medians over ``--repeats`` runs are printed.

    python benchmarks/export_tf.py                      # ssd300 and ssd512, 3 runs each
    python benchmarks/export_tf.py ssd300 --repeats 5

Figures: wall seconds of the whole export (build + tf2onnx + validation on 3 COCO
images) and of each phase, the ONNX file size in bytes (MB = 10^6 bytes), the peak
resident memory of the child (ru_maxrss), and the largest |TF - ONNX| differences of
the validation (random-init weights: the default when no Keras weights are given).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(name: str, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from exporters import default_output, export_model
    from exporters.registry import load_registry

    spec = load_registry().get(name)
    result = export_model(spec, default_output(spec, Path(out_dir)))
    v = result.validation
    print("RESULT " + json.dumps({
        "seconds": result.seconds, "seconds_build": v["seconds_build"], "seconds_convert": v["seconds_convert"],
        "seconds_validate": v["seconds_validate"], "file_bytes": v["file_bytes"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "priors": v["priors"], "source_params": result.contract.source_params,
        "max_abs_diff": {k: v[f"max_abs_diff_{k}"] for k in ("boxes", "scores", "prior_boxes", "prior_scores")},
        "detections_per_image": v["detections_per_image"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=["ssd300", "ssd512"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("NAME", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    for name in args.names:
        runs = []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run([sys.executable, __file__, "--child", name, tmp], capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{name} run {i + 1} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{name} run {i + 1}/{args.repeats}: {json.dumps(runs[-1])}", flush=True)
        med = {k: statistics.median(r[k] for r in runs) for k in
               ("seconds", "seconds_build", "seconds_convert", "seconds_validate", "peak_rss_mb")}
        last = runs[-1]
        diffs = {k: max(r["max_abs_diff"][k] for r in runs) for k in last["max_abs_diff"]}
        print(f"{name} (random-init, {args.repeats} runs, median wall seconds): export {med['seconds']:.1f} s "
              f"= build {med['seconds_build']:.1f} + tf2onnx {med['seconds_convert']:.1f} + "
              f"validation {med['seconds_validate']:.1f}; ONNX {last['file_bytes']:,} bytes "
              f"({last['file_bytes'] / 1e6:.1f} MB); peak RSS {med['peak_rss_mb']:.0f} MiB (median); "
              f"{last['priors']:,} priors; {last['source_params']:,} Keras parameters; "
              f"max |TF - ONNX| over runs and 3 COCO images: {json.dumps(diffs)}; "
              f"detections per image {last['detections_per_image']}")


if __name__ == "__main__":
    main()
