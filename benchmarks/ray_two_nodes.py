"""Two Ray worker nodes on this machine, on loopback: images/s with one worker node vs two,
object-store traffic per image, and `cli.py eval --ray` with the second node's raylet killed
mid-evaluation, against `cli.py eval` in one process (docs/scale.md, "Two nodes on this machine").

    python cli.py export yolov3-tiny
    python benchmarks/ray_two_nodes.py results/onnx/yolov3-tiny.onnx --coco ../shared/data/coco-val2017-subset \
        [--images N] [--kill-at 40] [--out F.json]

The cluster is Ray's ``cluster_utils.Cluster`` (as ``tests/test_ray_cluster.py`` builds it): a
head with no CPU (it coordinates and holds the driver's objects) and worker nodes of 1 CPU
each, every process on 127.0.0.1. Nodes are started one after the other, each only once the
previous one has registered; Ray gives a raylet a fixed 30 s to register (``ray._private.node``,
not configurable), which a loaded machine can exceed, so a node that fails to start is
removed (its processes killed) and started again, at most ``--start-attempts`` times.

1. One worker node, then two: ``evaluate_model_ray`` in this process over the images, one
   actor per worker node. Images/s over the image loop; the bytes the raylets received over
   TCP during the run (``ss -ti`` bytes_received of every socket a raylet holds, summed: the
   object manager's transfers between nodes, plus the raylets' gRPC with the GCS and their
   workers), per image, next to the prepared tensor's size and the model's bytes (sent to a
   node whose $TMPDIR lacks the model's file: on one machine the nodes share it, so only the
   first run here transfers the model, once). ``/proc/PID/io`` does not count these: gRPC sends with sendmsg, which
   wchar/rchar leave out.
2. The command line against the two-node cluster, as a user runs it:
   ``cli.py eval MODEL --coco DIR --ray --ray-address 127.0.0.1:PORT --ray-actors 2``; once its
   detection cache holds ``--kill-at`` images, the second worker node's raylet gets SIGKILL.
   Its exit code, wall time, the images each node evaluated and the losses it re-issued,
   and its statistics next to ``cli.py eval MODEL --coco DIR`` in one process.

The machine is shared: the 1-minute load average is saved with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tcp_received(pids: list[int]) -> dict[str, int]:
    """Per TCP connection a process of ``pids`` holds (local, remote address): bytes received so far."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    found: dict[str, int] = {}
    key = None
    for line in out.splitlines():
        if line and not line[0].isspace():  # a socket; its counters follow on an indented line
            fields = line.split()
            key = f"{fields[3]} {fields[4]}" if any(f"pid={pid}," in line for pid in pids) else None
        elif key is not None:
            match = re.search(r"bytes_received:(\d+)", line)
            found[key] = int(match.group(1)) if match else 0
            key = None
    return found


def received_between(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes received in between, over connections open at the end (those opened meanwhile count whole)."""
    return sum(n - before.get(conn, 0) for conn, n in after.items())


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def children() -> set[int]:
    """Live processes below this one (from /proc's parent links)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [os.getpid()]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def add_node(cluster, attempts: int, log: list) -> object:
    """A worker node of 1 CPU, registered with the GCS; a start that times out is cleaned up and retried."""
    for attempt in range(1, attempts + 1):
        before, t0 = children(), time.perf_counter()
        try:
            node = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes(timeout=300)
            log.append({"attempt": attempt, "seconds": round(time.perf_counter() - t0, 1),
                        "load": os.getloadavg()[0]})
            return node
        except Exception as exc:  # Ray's fixed 30 s registration wait, on a loaded machine
            log.append({"attempt": attempt, "failed": str(exc)[:200], "seconds": round(time.perf_counter() - t0, 1),
                        "load": os.getloadavg()[0]})
            for pid in children() - before:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(5)
    raise SystemExit(f"a worker node did not start in {attempts} attempts: {log}")


def stored_eval(results: Path) -> dict:
    from core import store

    records = [r for r in store.load(root=results).records if r["kind"] == "eval"]
    return records[-1] if records else {}  # "data" holds the figures, "settings" the run's (settings.ray)


def cache_lines(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)  # minus the header
    except OSError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--coco", type=Path, required=True)
    ap.add_argument("--images", type=int, help="the first N images (default: all)")
    ap.add_argument("--kill-at", type=int, default=40, help="images in the cache when the second node is killed")
    ap.add_argument("--start-attempts", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true", help="only the command-line runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model, coco = args.model.resolve(), args.coco.resolve()
    limit = ["--limit", str(args.images)] if args.images else []

    tmp = Path(tempfile.mkdtemp(prefix="dbray-"))  # short: Ray's socket paths live under it
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["TMPDIR"] = str(tmp)
    from ray.cluster_utils import Cluster

    from eval.ray_eval import RaySettings, evaluate_model_ray, loopback_only

    out: dict = {"model": str(model), "model_bytes": model.stat().st_size, "images": args.images or "all",
                 "node_starts": []}
    try:
        from eval.coco import model_contract

        c = model_contract(model)
        out["prepared_tensor_bytes"] = 4 * 3 * c.input_height * c.input_width  # float32, 1 x 3 x H x W
    except Exception as exc:  # the figure is only for comparison
        out["prepared_tensor_bytes"] = f"unknown: {exc}"
    t_start = time.perf_counter()
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            workers = [add_node(cluster, args.start_attempts, out["node_starts"])]
            out["cluster_start_seconds"] = round(time.perf_counter() - t_start, 1)
            for count in (() if args.skip_throughput else (1, 2)):
                if len(workers) < count:
                    workers.append(add_node(cluster, args.start_attempts, out["node_starts"]))
                pids = [raylet_pid(n) for n in (cluster.head_node, *workers)]
                before, load0, t0 = tcp_received(pids), os.getloadavg()[0], time.perf_counter()
                result = evaluate_model_ray(model, coco_dir=coco, limit=args.images, store=False,
                                            results_file=tmp / f"r{count}.json", cache_file=tmp / f"c{count}.jsonl",
                                            ray_settings=RaySettings(address=cluster.address, actors=count))
                wall = time.perf_counter() - t0
                received = received_between(before, tcp_received(pids))
                n = result.images_evaluated
                out[f"{count}_worker_node"] = {
                    "images": n, "images_per_s_loop": round(n / result.loop_seconds, 2),
                    "loop_seconds": round(result.loop_seconds, 1), "wall_seconds": round(wall, 1),
                    "raylets_tcp_bytes_received": received, "per_image": round(received / n),
                    "images_per_node": {k[:8]: len(v) for k, v in result.settings["ray"]["image_nodes"].items()},
                    "map50": result.scores["map50"], "load_before": load0, "load_after": os.getloadavg()[0]}
                print(json.dumps({f"{count}_worker_node": out[f"{count}_worker_node"]}), flush=True)
            while len(workers) < 2:
                workers.append(add_node(cluster, args.start_attempts, out["node_starts"]))

            # the command line; the second worker node's raylet killed once --kill-at images are in the cache
            env = dict(os.environ, DETBENCH_RESULTS=str(tmp / "ray-results"))
            cache = tmp / "kill-cache.jsonl"
            cmd = [sys.executable, "cli.py", "eval", str(model), "--coco", str(coco), *limit, "--ray",
                   "--ray-address", cluster.address, "--ray-actors", "2", "--cache", str(cache),
                   "--out", str(tmp / "kill.json")]
            victim = raylet_pid(workers[1])
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            killed_at = None
            while proc.poll() is None:
                done = cache_lines(cache)
                if killed_at is None and done >= args.kill_at:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = {"images_in_cache": done, "seconds": round(time.perf_counter() - t0, 1)}
                time.sleep(0.2)
            stdout, stderr = proc.communicate()
            record = stored_eval(tmp / "ray-results")
            ray_info = (record.get("settings") or {}).get("ray") or {}
            if not ray_info:
                print(f"the stored record has no settings.ray: {sorted(record)}", file=sys.stderr)
            out["killed_run"] = {
                "command": " ".join(cmd), "rc": proc.returncode, "killed": killed_at,
                "second_node": workers[1].node_id[:8], "wall_seconds": round(time.perf_counter() - t0, 1),
                "load_before": load0, "load_after": os.getloadavg()[0],
                "images_per_node": {k[:8]: len(v) for k, v in (ray_info.get("image_nodes") or {}).items()},
                "reissued_after": ray_info.get("reissued_after"), "stdout": stdout[-1500:], "stderr": stderr[-3000:],
                "stats": (record.get("data") or {}).get("stats")}
            print(json.dumps({"killed_run": {k: v for k, v in out["killed_run"].items()
                                             if k not in ("stdout", "stderr")}}), flush=True)
        finally:
            cluster.shutdown()

    env = dict(os.environ, DETBENCH_RESULTS=str(tmp / "local-results"))
    cmd = [sys.executable, "cli.py", "eval", str(model), "--coco", str(coco), *limit,
           "--cache", str(tmp / "local-cache.jsonl"), "--out", str(tmp / "local.json")]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    local = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    record = stored_eval(tmp / "local-results")
    out["single_process"] = {"command": " ".join(cmd), "rc": local.returncode,
                             "wall_seconds": round(time.perf_counter() - t0, 1), "load_before": load0,
                             "stats": (record.get("data") or {}).get("stats"),
                             "stderr": local.stderr[-1500:] if local.returncode else ""}
    killed = out["killed_run"]
    out["killed_run_same_stats"] = bool(killed["stats"]) and killed["stats"] == out["single_process"]["stats"]
    out["same_results_file"] = ((tmp / "kill.json").exists() and (tmp / "local.json").exists()
                                and (tmp / "kill.json").read_bytes() == (tmp / "local.json").read_bytes())
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' caches, results files and Ray's session folders


if __name__ == "__main__":
    main()
