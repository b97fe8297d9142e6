"""Two Ray nodes on this machine, on loopback: throughput with one node vs two, object-store
traffic per image, and `eval --ray` with the second node's raylet killed mid-run (docs/scale.md).

    python benchmarks/ray_two_nodes.py MODEL.onnx --coco DIR [--images 144] [--kill-after 14] [--out F.json]

1. A cluster as ``tests/test_ray_cluster.py`` builds it (Ray's ``cluster_utils.Cluster``: a
   head with no CPU, worker nodes of 1 CPU each, every process on 127.0.0.1), with one
   worker node, then with two: ``evaluate_model_ray`` on ``--images`` images with one actor
   per worker node. Images/s over the whole image loop; bytes the raylets wrote to sockets
   and files (``/proc/PID/io`` wchar: the object manager's transfers between nodes, plus
   their logs) per image, and the prepared tensor's size for comparison.
2. The command line against the two-node cluster, as a user runs it:
   ``cli.py eval MODEL --ray-address 127.0.0.1:PORT --ray-actors 2``, with the second node's
   raylet sent SIGKILL ``--kill-after`` seconds after the command started; its exit code,
   wall time and statistics next to ``cli.py eval MODEL`` without Ray (single process).

The machine is shared: the 1-minute load average is saved with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wchar(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def raylet_pids(nodes) -> list[int]:
    from ray._private import ray_constants

    return [n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for n in nodes]


def stats_of(path: Path) -> dict:
    from core import store

    records = [r for r in store.load(root=path).records if r["kind"] == "eval"]
    return records[-1]["data"]["stats"] if records else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--coco", type=Path, required=True)
    ap.add_argument("--images", type=int, default=144)
    ap.add_argument("--kill-after", type=float, default=14.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dbray-"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["TMPDIR"] = str(tmp)
    from ray.cluster_utils import Cluster

    from eval.ray_eval import RaySettings, evaluate_model_ray, loopback_only

    out: dict = {"images": args.images, "model": str(args.model)}
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            workers = [cluster.add_node(num_cpus=1)]
            cluster.wait_for_nodes()
            for count in (1, 2):
                if len(workers) < count:
                    workers.append(cluster.add_node(num_cpus=1))
                    cluster.wait_for_nodes()
                pids = raylet_pids([cluster.head_node, *workers])
                before, load0, t0 = wchar(pids), os.getloadavg()[0], time.perf_counter()
                result = evaluate_model_ray(args.model, coco_dir=args.coco, limit=args.images, store=False,
                                            results_file=tmp / f"r{count}.json", cache_file=tmp / f"c{count}.jsonl",
                                            ray_settings=RaySettings(address=cluster.address, actors=count))
                wall = time.perf_counter() - t0
                written = wchar(pids) - before
                out[f"{count}_node"] = {
                    "images_per_s_loop": round(result.images_evaluated / result.loop_seconds, 2),
                    "loop_seconds": round(result.loop_seconds, 1), "wall_seconds": round(wall, 1),
                    "raylet_bytes_written_per_image": round(written / result.images_evaluated),
                    "images_per_node": {k[:8]: len(v) for k, v in result.settings["ray"]["image_nodes"].items()},
                    "map50": result.scores["map50"], "load_before": load0, "load_after": os.getloadavg()[0]}
                print(json.dumps({f"{count}_node": out[f"{count}_node"]}), flush=True)

            # the command line, the second node's raylet killed mid-run
            env = dict(os.environ, DETBENCH_RESULTS=str(tmp / "ray-results"))
            cmd = [sys.executable, str(ROOT / "cli.py"), "eval", str(args.model), "--coco", str(args.coco),
                   "--limit", str(args.images), "--ray-address", cluster.address, "--ray-actors", "2",
                   "--cache", str(tmp / "kill-cache.jsonl"), "--out", str(tmp / "kill.json")]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(args.kill_after)
            raylet_pid = raylet_pids([workers[1]])[0]
            os.kill(raylet_pid, signal.SIGKILL)
            killed_at = time.perf_counter() - t0
            stdout, stderr = proc.communicate(timeout=1800)
            out["killed_run"] = {"command": " ".join(cmd), "rc": proc.returncode, "killed_at_s": round(killed_at, 1),
                                 "wall_seconds": round(time.perf_counter() - t0, 1), "stdout": stdout[-2000:],
                                 "stderr": stderr[-3000:], "stats": stats_of(tmp / "ray-results")}
        finally:
            cluster.shutdown()

    env = dict(os.environ, DETBENCH_RESULTS=str(tmp / "local-results"))
    cmd = [sys.executable, str(ROOT / "cli.py"), "eval", str(args.model), "--coco", str(args.coco), "--limit",
           str(args.images), "--cache", str(tmp / "local-cache.jsonl"), "--out", str(tmp / "local.json")]
    t0 = time.perf_counter()
    local = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out["single_process"] = {"command": " ".join(cmd), "rc": local.returncode,
                             "wall_seconds": round(time.perf_counter() - t0, 1), "stats": stats_of(tmp / "local-results")}
    killed = out["killed_run"]
    out["killed_run_same_stats"] = bool(killed["stats"]) and killed["stats"] == out["single_process"]["stats"]
    out["same_results_file"] = (tmp / "kill.json").read_bytes() == (tmp / "local.json").read_bytes() \
        if (tmp / "kill.json").exists() else False
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
