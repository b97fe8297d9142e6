"""INT8 vs float32 latency on onnxruntime CPU, measured side by side in one process.

Both sessions are created first (intra-op spinning off, so that the idle one does not
busy-wait on the cores the other is timed on); then each round runs the float model and the
INT8 model alternately (``--reps`` runs each, order swapped every round), so that load from
other processes on a shared machine hits both alike. Reported: median latency of each (ms,
wall time of ``session.run`` on one real COCO image, 2 intra-op threads by default) and the
speed-up as the median of the per-round ratios float / int8.

    python benchmarks/int8_speed.py results/onnx/yolov3-tiny.onnx results/onnx/yolov3-tiny@int8.onnx
    python benchmarks/int8_speed.py FLOAT INT8 [FLOAT INT8 ...] --rounds 9 --reps 5 --level all
    python benchmarks/int8_speed.py FLOAT INT8 --profile   # per-op-type time of the INT8 graph
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session(path: Path, threads: int, level: str, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.log_severity_level = 3
    # the two sessions alternate: a session left spinning after its run would busy-wait on the cores
    # the other one is being timed on (as `bench` opens sessions that alternate)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = f"/tmp/int8prof-{path.stem}"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def image_tensor(model: Path, image: Path):
    from core.contract import read_contract
    from core.images import load_rgb, prepare_for

    return prepare_for(load_rgb(image), read_contract(model))[0]


def timed(sess, feed, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def compare(fp32: Path, int8: Path, args) -> dict:
    tensor = image_tensor(fp32, args.image)
    feed = {"images": tensor}
    sessions = {"fp32": session(fp32, args.threads, args.level), "int8": session(int8, args.threads, args.level)}
    for s in sessions.values():
        timed(s, feed, args.warmup)
    samples = {"fp32": [], "int8": []}
    ratios = []
    for r in range(args.rounds):
        order = ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")
        got = {k: statistics.median(timed(sessions[k], feed, args.reps)) for k in order}
        for k, v in got.items():
            samples[k].append(v)
        ratios.append(got["fp32"] / got["int8"])
    result = {"fp32": str(fp32), "int8": str(int8), "threads": args.threads, "level": args.level,
              "fp32_ms": statistics.median(samples["fp32"]), "int8_ms": statistics.median(samples["int8"]),
              "speedup": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
              "rounds": args.rounds, "reps": args.reps}
    if args.profile:
        result["int8_profile"] = profile(int8, feed, args)
        result["fp32_profile"] = profile(fp32, feed, args)
    return result


def profile(path: Path, feed, args) -> dict:
    """Mean kernel time per op type (ms per run) from onnxruntime's profiler."""
    sess = session(path, args.threads, args.level, profile=True)
    runs = max(args.reps, 3)
    for _ in range(runs + 1):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] += ev["dur"] / 1000 / (runs + 1)
            count[op] += 1
    return {op: {"ms": round(ms, 3), "kernels": count[op] // (runs + 1)}
            for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="pairs: FLOAT.onnx INT8.onnx ...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--level", choices=sorted(LEVELS), default="all")
    parser.add_argument("--image", type=Path, default=None, help="default: the first COCO subset image")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if len(args.models) % 2:
        parser.error("give FLOAT INT8 pairs")
    if args.image is None:
        from core.paths import data_dir

        args.image = sorted((data_dir() / "coco-val2017-subset" / "val2017").glob("*.jpg"))[0]
    results = []
    for fp32, int8 in zip(args.models[::2], args.models[1::2]):
        r = compare(fp32, int8, args)
        results.append(r)
        print(f"{fp32.name} vs {int8.name}: fp32 {r['fp32_ms']:.1f} ms, int8 {r['int8_ms']:.1f} ms (medians, "
              f"{args.threads} threads, level {args.level}) -> speed-up {r['speedup']:.2f}x "
              f"(median of {args.rounds} alternating rounds; range {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
        for key in ("int8_profile", "fp32_profile"):
            if key in r:
                top = list(r[key].items())[:12]
                print(f"  {key}: " + ", ".join(f"{op} {v['ms']:.2f} ms/{v['kernels']}" for op, v in top))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
