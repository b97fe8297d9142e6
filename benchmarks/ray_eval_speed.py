"""Figures for docs/scale.md: per-image inference time, Ray eval throughput with 1 and 2 actors, scoring time.

    python benchmarks/ray_eval_speed.py [--models yolov3-tiny,yolov3-416,ssd300] [--onnx-dir results/onnx]
                                        [--images 144] [--timing-images 6] [--score-copies 35] [--out F.json]

Measures, on this machine, with onnxruntime's CPU provider (float32):

1. per-image inference time of each model (``--onnx-dir``/NAME.onnx, as exported; latency
   does not depend on weight values): mean and median of ``session.run`` over
   ``--timing-images`` real COCO images after one warm-up, with 1 and with 2 intra-op threads;
2. the throughput of ``eval --ray`` on yolov3-tiny over ``--images`` images, on a local Ray
   instance, with 1 actor x 1 thread, 2 actors x 1 thread and 1 actor x 2 threads: images/s
   over the whole image loop (actor start-up included) and in steady state (from the first
   to the last image delivered to the driver), next to the local loop's images/s;
3. pycocotools' scoring time (COCOeval evaluate + accumulate + summarize) for a results file
   of val2017's size: the subset's annotations and yolov3-tiny's detections replicated
   ``--score-copies`` times under new image ids (35 x 144 = 5,040 images).

The machine is shared (2 cores, other jobs running): the 1-minute load average before and
after each section is saved with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load() -> float:
    return os.getloadavg()[0]


def inference_times(models: list[str], onnx_dir: Path, coco: Path, count: int) -> dict:
    from eval.coco import model_contract
    from eval.dataset import load_coco
    from eval.image_feed import prepare_image
    from runtime.backends import BackendSettings, get_backend

    dataset = load_coco(coco)
    images = dataset.select(count)
    out = {}
    for name in models:
        path = onnx_dir / f"{name}.onnx"
        if not path.is_file():
            out[name] = {"missing": str(path)}
            continue
        contract = model_contract(path)
        tensors = [prepare_image(img, contract).tensor for img in images]
        row = {"input": [contract.input_height, contract.input_width], "weights": contract.weights[:12]}
        for threads in (1, 2):
            before = load()
            with get_backend("cpu").open(path, BackendSettings(threads=threads)) as runner:
                runner.run(tensors[0])  # warm-up
                times = []
                for tensor in tensors:
                    t0 = time.perf_counter()
                    runner.run(tensor)
                    times.append(time.perf_counter() - t0)
            row[f"threads_{threads}"] = {"mean_s": statistics.mean(times), "median_s": statistics.median(times),
                                         "images": len(times), "load_before": before, "load_after": load()}
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def ray_throughput(model: Path, coco: Path, images: int, work: Path) -> dict:
    import ray

    from eval.coco import evaluate_model
    from eval.ray_eval import RaySettings, evaluate_model_ray

    out = {}
    before = load()
    local = evaluate_model(model, coco_dir=coco, limit=images, results_file=work / "local.json",
                           cache_file=work / "local.jsonl", store=False)
    out["local_loop"] = {"images_per_s": images / local.loop_seconds, "loop_s": local.loop_seconds,
                         "session_s_per_image": local.session_seconds / images,
                         "threads": "onnxruntime default", "load_before": before, "load_after": load()}
    print("local", json.dumps(out["local_loop"]), flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        for actors, threads in ((1, 1), (2, 1), (1, 2)):
            arrivals: list[tuple[float, int]] = []

            def seen(p) -> None:
                if p.image is not None:
                    arrivals.append((p.wall_seconds, p.done))

            before = load()
            result = evaluate_model_ray(model, coco_dir=coco, limit=images, results_file=work / "ray.json",
                                        cache_file=work / "ray.jsonl", store=False, progress=seen, threads=threads,
                                        ray_settings=RaySettings(actors=actors))
            (t_first, n_first), (t_last, n_last) = arrivals[0], arrivals[-1]
            key = f"{actors}_actor_x_{threads}_thread"
            out[key] = {"images_per_s": images / result.loop_seconds, "loop_s": result.loop_seconds,
                        "steady_images_per_s": (n_last - n_first) / (t_last - t_first),
                        "first_image_after_s": t_first, "session_s_per_image": result.session_seconds / images,
                        "same_stats_as_local": result.scores["stats"] ==
                        local.scores["stats"], "load_before": before, "load_after": load()}
            print(key, json.dumps(out[key]), flush=True)
    finally:
        ray.shutdown()
    return out


def scoring_time(model: Path, coco: Path, copies: int, work: Path) -> dict:
    from eval.coco import evaluate_model, score_results
    from eval.dataset import read_annotations

    base = evaluate_model(model, coco_dir=coco, results_file=work / "all.json", cache_file=work / "all.jsonl",
                          store=False)
    gt = read_annotations(coco / "annotations" / "instances_val2017.json")
    dets = json.loads(Path(base.results_file).read_text())
    stride = max(img["id"] for img in gt["images"]) + 1
    images, anns, results = [], [], []
    for c in range(copies):
        shift = c * stride
        images += [{**img, "id": img["id"] + shift} for img in gt["images"]]
        anns += [{**a, "id": a["id"] + c * 10_000_000, "image_id": a["image_id"] + shift} for a in gt["annotations"]]
        results += [{**d, "image_id": d["image_id"] + shift} for d in dets]
    big = {**gt, "images": images, "annotations": anns}
    out = {}
    for backend in ("pycocotools", "faster-coco-eval"):
        before = load()
        t0 = time.perf_counter()
        scores = score_results(results, big, backend)
        seconds = time.perf_counter() - t0
        out[backend] = {"seconds": seconds, "images": scores["images"], "detections": len(results),
                        "annotations": len(anns), "map50": scores["map50"], "subset_map50": base.scores["map50"],
                        "load_before": before, "load_after": load()}
        print("score", backend, json.dumps(out[backend]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov3-tiny,yolov3-416,ssd300")
    parser.add_argument("--onnx-dir", type=Path, default=ROOT / "results" / "onnx")
    parser.add_argument("--coco", type=Path, default=None)
    parser.add_argument("--images", type=int, default=144)
    parser.add_argument("--timing-images", type=int, default=6)
    parser.add_argument("--score-copies", type=int, default=35)
    parser.add_argument("--sections", default="inference,ray,scoring")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from core.paths import data_dir

    coco = args.coco or data_dir() / "coco-val2017-subset"
    sections = set(args.sections.split(","))
    figures: dict = {"cpus": os.cpu_count(), "note": "shared 2-core machine; onnxruntime CPU provider, float32"}
    with tempfile.TemporaryDirectory(prefix="ray-eval-speed-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("DETBENCH_RESULTS", str(work / "results"))
        if "inference" in sections:
            figures["inference"] = inference_times(args.models.split(","), args.onnx_dir, coco, args.timing_images)
        tiny = args.onnx_dir / "yolov3-tiny.onnx"
        if "ray" in sections:
            figures["ray"] = ray_throughput(tiny, coco, args.images, work)
        if "scoring" in sections:
            figures["scoring"] = scoring_time(tiny, coco, args.score_copies, work)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
