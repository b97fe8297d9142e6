"""Does alternating runtimes in one process bias their latency ratios? (issue 22, item 4)

yolov3-416 (random init: latency does not depend on the weights) on onnxruntime CPU, OpenVINO,
PyTorch (onnx2torch: the network part in PyTorch eager, post-processing on onnxruntime CPU; a
Darknet model has no PyTorch-native runner) and the native runner (OpenCV DNN reading the Darknet
cfg), timed with the project's bench (:func:`runtime.bench.bench_side_by_side`) four ways:

- ``passive``: alternating in one process with passive waiting, as ``bench`` does with several
  backends (``BackendSettings.passive_wait=True``: onnxruntime sessions with
  ``session.intra_op.allow_spinning=0``; ncnn ``openmp_blocktime=0``);
- ``passive+omp``: the same with ``OMP_WAIT_POLICY=PASSIVE`` in the process's environment (read by
  the OpenMP runtimes PyTorch and OpenCV link when they start; no detbench setting does this);
- ``spinning``: alternating in one process, every runtime's default waiting (the old behaviour:
  ``passive_wait=False``);
- ``alone``: each backend alone in its own process (its library's defaults, nothing else loaded).

Every way runs in fresh child processes, ``--rounds`` times, the ways' order rotating between
rounds; each figure is the median over the rounds of the p50 (and of the per-round ratio to
onnxruntime CPU: same process for the alternating ways; the ``alone`` ratio divides the two
processes' p50s of the same round). The 1-minute load average before and after is printed.

    python benchmarks/fair_alternation.py --model ../cc20b/results/onnx/yolov3-416.onnx [--rounds 3] [--seconds 4]

Measured 2026-12-07 23:57-00:13 UTC, 2 threads, 3 rounds, 4 s per backend (n = 4-8 runs: every p50
INVALID), load average 5-8 on the 2 cores (other jobs): median p50 ms (median ratio to onnxruntime CPU)

    way          cpu    openvino      onnx2torch    native (OpenCV)
    passive      862    893 (1.03x)   3525 (4.09x)  2201 (2.66x)
    passive+omp  824    989 (1.20x)   1196 (1.57x)  2013 (2.71x)
    spinning     1058   1024 (0.92x)  5582 (5.28x)  2293 (2.07x)
    alone        1165   982 (0.89x)   3939 (3.24x)  1886 (1.55x)

On a loaded host the largest effect is OpenMP's spin-waiting, not alternation: PyTorch is 3-5x
slower than with OMP_WAIT_POLICY=PASSIVE whether it alternates or runs alone. The same variable
took ncnn from 6.6x to 0.91x (yolov3-tiny) in runtime_table.py --omp-passive: ncnn's
openmp_blocktime=0 did not stop it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WAYS = ("passive", "passive+omp", "spinning", "alone")
BACKENDS = ("cpu", "openvino", "onnx2torch", "native")


def child(args) -> int:
    from runtime.backends import BackendSettings
    from runtime.bench import BenchSettings, bench_side_by_side

    names = args.backends.split(",")
    settings = BenchSettings(seconds=args.seconds, rounds=args.bench_rounds,
                             warmup=2, peak=False, parity=False)
    passive = {"passive": True, "passive+omp": True, "spinning": False, "alone": None}[args.child]
    results = bench_side_by_side(Path(args.model), names, settings,
                                 BackendSettings(threads=args.threads, passive_wait=passive))
    out = {r.provider: {"p50_ms": r.latency.p50, "n": r.latency.n, "ratio_to_cpu": r.ratio_to_cpu,
                        "p50_verdict": r.judged.verdicts["p50"].label,
                        "passive_wait": r.settings.get("passive_wait")} for r in results}
    Path(args.out).write_text(json.dumps(out))
    return 0


def run(way: str, backends: list[str], args, out: Path) -> dict:
    env = dict(os.environ)
    if way == "passive+omp":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, __file__, "--child", way, "--backends", ",".join(backends), "--model", str(args.model),
           "--seconds", str(args.seconds), "--threads", str(args.threads), "--bench-rounds", str(args.bench_rounds),
           "--out", str(out)]
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{way} {backends}: exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="yolov3-416.onnx (any contract file)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="cpu first")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of every way")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per backend per measurement")
    parser.add_argument("--bench-rounds", type=int, default=4, help="alternation blocks within one measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/detbench-fair-alternation"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.scratch = args.scratch.resolve()
    os.environ["DETBENCH_RESULTS"] = str(args.scratch)  # the onnx2torch conversion cache
    from core import _load_order  # noqa: F401  (triton before tensorflow)

    if args.child:
        return child(args)

    backends = args.backends.split(",")
    if backends[0] != "cpu":
        parser.error("--backends must start with cpu (the reference of every ratio)")
    args.scratch.mkdir(parents=True, exist_ok=True)
    started, load_before = time.monotonic(), os.getloadavg()
    rounds: list[dict] = []
    for k in range(args.rounds):
        order = list(WAYS[k % len(WAYS):] + WAYS[:k % len(WAYS)])
        this: dict[str, dict] = {}
        for way in order:
            print(f"[{time.strftime('%H:%M:%S')}] round {k + 1}: {way} (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
            if way == "alone":
                this[way] = {}
                for b in backends:
                    this[way].update(run(way, [b], args, args.scratch / f"{way}-{b}.json"))
                cpu = this[way]["cpu"]["p50_ms"]
                for b in backends:
                    this[way][b]["ratio_to_cpu"] = this[way][b]["p50_ms"] / cpu
            else:
                this[way] = run(way, backends, args, args.scratch / f"{way}.json")
        rounds.append(this)
    load_after = os.getloadavg()

    lines = [f"yolov3-416 ({args.model}), {args.threads} threads, {args.seconds:g} s timed per backend per "
             f"measurement, median over {args.rounds} rounds; load average (1 min) {load_before[0]:.2f} before, "
             f"{load_after[0]:.2f} after; {(time.monotonic() - started) / 60:.1f} min",
             "", "| way | " + " | ".join(f"{b} p50 ms (ratio to cpu)" for b in backends) + " |",
             "|---|" + "---|" * len(backends)]
    summary: dict[str, dict] = {}
    for way in WAYS:
        cells = []
        for b in backends:
            p50 = statistics.median(r[way][b]["p50_ms"] for r in rounds)
            ratio = statistics.median(r[way][b]["ratio_to_cpu"] for r in rounds)
            ns = [r[way][b]["n"] for r in rounds]
            summary.setdefault(way, {})[b] = {"p50_ms": p50, "ratio_to_cpu": ratio, "n": ns,
                                              "per_round_ratio": [r[way][b]["ratio_to_cpu"] for r in rounds]}
            cells.append(f"{p50:.0f} ({ratio:.2f}x, n={min(ns)}-{max(ns)})")
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rounds, "load": [load_before, load_after],
                                         "settings": vars(args) | {"model": str(args.model), "scratch": str(args.scratch),
                                                                   "json": str(args.json)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
