"""COCO evaluation on a Ray cluster: the same detections and scores as ``eval.coco``, from many processes.

The pipeline is Ray Data, streamed::

    driver: contract, dataset, selection, detection cache      (as eval.coco.evaluate_model)
      -> ray.data.from_items(image records, one block per batch)
      -> map_batches(_prepare_batch)      tasks: decode + resize (eval.pipeline.prepare_image)
      -> map_batches(_Detector)           actor pool: one session per actor, created once;
                                          outputs -> COCO entries (eval.coco.to_coco_detections)
      -> driver iterates the output batches, adding each image to the DetectionCache as it arrives
      -> eval.coco.finish_evaluation      one COCOeval over everything, as a local run

Every step that decides a number is the local evaluation's own function, run
elsewhere; a batch's detections travel back as JSON text, which round-trips Python
floats exactly, so a Ray run writes the very results file a local run writes. The
cache header is ``eval.coco.eval_files``'s, so either kind of run resumes the other.

Where the inputs come from:

- the model: the driver puts the file's bytes in the object store once; the first
  actor on each node writes them to a node-local file named by their sha256, which
  every actor on that node opens. No shared filesystem is needed for models.
- the images: the prepare tasks read them by path, so every node must see the COCO
  folder at the same path (a shared filesystem, or a copy at the same place).
- the code: a local instance is given this checkout on ``PYTHONPATH``; the nodes of a
  running cluster must have detbench installed (the same version as the driver).

Fault tolerance is Ray's: inference actors are restarted after their process dies
(``max_restarts``) and the batch they held is retried on the restarted actor
(``max_task_retries``); prepare tasks are retried (``max_retries``). Detections do not
depend on which process computes them, so the result is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.contract import OUTPUT_NAMES, ModelContract
from core.errors import ConfigError, DetbenchError, ProviderUnavailableError
from core.images import Placement
from eval.coco import (EvalProgress, EvalResult, EvalSettings, ProgressCallback, eval_files, finish_evaluation,
                       model_contract, to_coco_detections)
from eval.dataset import CocoImage, load_coco
from eval.pipeline import DetectionCache, Prepared, prepare_image

# Bounded, not Ray Data's default of unbounded: a model that kills its process on every
# image would otherwise restart forever instead of failing the run.
ACTOR_MAX_RESTARTS = 4
ACTOR_MAX_TASK_RETRIES = 4
TASK_MAX_RETRIES = 4
# Decoding and resizing is about a tenth of inference time per image for the registry's
# models: the prepare tasks ask for no logical CPU, so that the cluster's CPUs all go to
# the sessions' threads (what the actors are sized by), and at most this many run at once
# per actor.
PREPARE_TASKS_PER_ACTOR = 2
DEFAULT_BATCH_SIZE = 4
_PLACEMENT_FIELDS = tuple(f.name for f in fields(Placement))


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the Ray pipeline runs.

    ``address``: None starts a local Ray instance for the run (all of this machine's
    CPUs, no dashboard, node address 127.0.0.1) and stops it afterwards (a Ray instance this
    process already started is used as it is); ``"auto"`` or ``"HOST:PORT"`` joins a
    running cluster. ``actors``: the inference actor pool's size (default: as many as
    the cluster's CPUs allow at ``EvalSettings.threads`` per actor, or one per GPU for GPU
    backends). ``batch_size``: images per block, the unit that is prepared, inferred,
    retried and cached at once.
    """

    address: str | None = None
    actors: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self):
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors {self.actors}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--ray-batch {self.batch_size}: must be at least 1")
        if self.address is not None and not self.address.strip():
            raise ConfigError("--ray-address is empty: give auto or HOST:PORT (or leave it out for a local instance)")


# --------------------------------------------------------------------------- the Ray instance


@contextlib.contextmanager
def ray_instance(address: str | None) -> Iterator[dict[str, float]]:
    """Ray connected for the duration of the block; yields the cluster's resources.

    See :class:`RaySettings` for ``address``. Raises :class:`ConfigError` when the
    cluster cannot be reached.
    """
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                                      configure_logging=False)
        if address is None:
            root = str(Path(__file__).resolve().parent.parent)
            pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            kwargs.update(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1",
                          runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        else:
            kwargs.update(address=address)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if address is None:
                raise ConfigError(f"--ray: a local Ray instance did not start ({exc}); see Ray's logs under "
                                  f"{tempfile.gettempdir()}/ray/session_latest/logs") from exc
            raise ConfigError(f"--ray-address {address}: cannot join a Ray cluster there ({exc}); start one with "
                              "`ray start --head` on the head node, or leave --ray-address out to run on a local "
                              "instance") from exc
        started = True
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- the stages


def open_runner(model_file: Path, provider: str, threads: int):
    """The backend runner an actor holds: opened as a local evaluation opens it (no fallback:
    nodes could fall back differently, and the cache is keyed by what runs)."""
    from runtime.backends import BackendSettings, get_backend

    chosen = get_backend(provider)
    settings = BackendSettings(threads=threads)
    chosen.require(settings)
    return chosen.open(model_file, settings)


def _identity(info) -> dict[str, Any]:
    """What a runner ran, as the cache header and the result record name it."""
    return {"provider": info.backend, "precision": info.precision,
            "providers_ran": list(info.detail.get("providers_ran") or
                                  [f"{info.library} {info.device} ({info.precision})"])}


def _probe(model: list, model_sha: str, provider: str, threads: int, parity: bool) -> dict[str, Any]:
    """Open the model once on a worker: what runs there (its precision keys the cache of a
    non-reference backend) and, as a local evaluation does first, its parity with onnxruntime CPU."""
    from eval.coco import _parity_first
    from runtime.backends import REFERENCE, BackendSettings

    with open_runner(_node_model_file(model, model_sha), provider, threads) as runner:
        out = _identity(runner.info)
        out["parity"] = (_parity_first(runner.path, runner, BackendSettings(threads=threads))
                         if parity and out["provider"] != REFERENCE else None)
        out["runtime"] = runner.info.to_dict()
        out["session"] = runner.info.detail.get("session")
    return out


def _prepare_batch(batch: dict[str, np.ndarray], contract: ModelContract) -> dict[str, np.ndarray]:
    """Decode and resize a batch of image records; a bad image keeps a zero tensor and its reason."""
    shape = (1, 3, contract.input_height, contract.input_width)
    tensors, placements, errors = [], [], []
    for k in range(len(batch["image_id"])):
        image = CocoImage(int(batch["image_id"][k]), str(batch["file_name"][k]), int(batch["width"][k]),
                          int(batch["height"][k]), Path(str(batch["path"][k])))
        item = prepare_image(image, contract)
        if item.error is not None:
            tensors.append(np.zeros(shape, np.float32))
            placements.append(np.zeros(len(_PLACEMENT_FIELDS)))
            errors.append(item.error)
        else:
            tensors.append(item.tensor)
            placements.append(np.array([getattr(item.placement, f) for f in _PLACEMENT_FIELDS], np.float64))
            errors.append("")
    return {"image_id": batch["image_id"], "file_name": batch["file_name"], "width": batch["width"],
            "height": batch["height"], "tensor": np.stack(tensors), "placement": np.stack(placements),
            "error": np.array(errors, dtype=object)}


def _node_model_file(model: list, model_sha: str) -> Path:
    """The model's bytes (``model[0]``, an object reference) as a file on this node, written once per node."""
    import ray

    folder = Path(tempfile.gettempdir()) / "detbench-ray-models"
    target = folder / f"{model_sha}.onnx"
    if target.is_file():
        return target
    data = ray.get(model[0])
    if hashlib.sha256(data).hexdigest() != model_sha:
        raise DetbenchError(f"the model's bytes reached {socket.gethostname()} altered (sha256 differs from "
                            f"{model_sha}); run again")
    folder.mkdir(parents=True, exist_ok=True)
    # Actors on one node may write at once: each writes its own temporary file and renames.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{model_sha[:10]}-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


class _Detector:
    """An inference actor: one session created once, then batches of prepared images -> COCO entries (JSON).

    A detbench error (the backend cannot run, a label outside the label space) is not
    raised here but returned with the batch, in the ``failure`` column: Ray would restart
    the actor and retry, and what reached the driver would be Ray's wrapper around the
    error's text. The driver raises it as the error it is (:func:`_failure`).
    """

    def __init__(self, model: list, model_sha: str, provider: str, threads: int, contract: ModelContract,
                 label_map: np.ndarray):
        self.contract = contract
        self.label_map = label_map
        self.host = socket.gethostname()
        self.failure = ""
        self.identity, self.load_seconds = "", 0.0
        hook = os.environ.get("DETBENCH_RAY_ACTOR_PIDS")
        if hook:  # tests find the actor processes to kill here
            with open(hook, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
        try:
            self.runner = open_runner(_node_model_file(model, model_sha), provider, threads)
        except DetbenchError as exc:
            self.failure = _failure_text(exc, self.host)
            return
        self.identity = json.dumps(_identity(self.runner.info), sort_keys=True)
        self.load_seconds = self.runner.info.load_seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        detections, seconds, failure = [], [], self.failure
        for k in range(len(batch["image_id"])):
            if failure or batch["error"][k]:
                detections.append("[]")
                seconds.append(0.0)
                continue
            image = CocoImage(int(batch["image_id"][k]), str(batch["file_name"][k]), int(batch["width"][k]),
                              int(batch["height"][k]), Path(""))
            placement = Placement(**{name: (int(v) if name in ("image_width", "image_height") else float(v))
                                     for name, v in zip(_PLACEMENT_FIELDS, batch["placement"][k])})
            tensor = np.ascontiguousarray(batch["tensor"][k])
            t0 = time.perf_counter()
            out = self.runner.run(tensor)
            outputs = [out[name] for name in OUTPUT_NAMES]
            seconds.append(time.perf_counter() - t0)
            try:
                found = to_coco_detections(outputs, Prepared(image, tensor, placement), self.label_map, self.contract)
            except DetbenchError as exc:
                failure = _failure_text(exc, self.host)
                detections.append("[]")
                continue
            detections.append(json.dumps(found, separators=(",", ":")))
        n = len(detections)
        return {"image_id": batch["image_id"], "file_name": batch["file_name"], "error": batch["error"],
                "detections": np.array(detections, dtype=object), "session_seconds": np.array(seconds),
                "host": np.array([self.host] * n, dtype=object), "pid": np.full(n, os.getpid()),
                "identity": np.array([self.identity] * n, dtype=object),
                "load_seconds": np.full(n, self.load_seconds), "failure": np.array([failure] * n, dtype=object)}


def _failure_text(exc: DetbenchError, host: str) -> str:
    return json.dumps({"class": type(exc).__name__, "message": str(exc), "host": host})


def _failure(text: str) -> DetbenchError:
    """The detbench error an actor reported (:class:`_Detector`), as an instance of its own class."""
    from core import errors

    payload = json.loads(text)
    cls = getattr(errors, payload["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, DetbenchError)):
        cls = DetbenchError
    # Some error classes take structured arguments; the message is already composed.
    exc = cls.__new__(cls)
    Exception.__init__(exc, payload["message"])
    return exc


def _pool_size(cluster: RaySettings, threads: int, resources: dict[str, float], gpu: bool) -> int:
    """Actors in the pool: as asked, else one per GPU for a GPU backend, else as many as the CPUs hold at ``threads`` each."""
    if cluster.actors is not None:
        return cluster.actors
    if gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ProviderUnavailableError("the Ray cluster has no GPU for a GPU provider's actors; run on a cluster "
                                           "whose nodes were started with GPUs, or choose --provider cpu")
        return gpus
    return max(1, int(resources.get("CPU", 1) // threads))


def _detbench_cause(exc: BaseException) -> DetbenchError | None:
    """The detbench error a Ray task or actor raised, from the wrapping Ray/Ray Data exceptions."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DetbenchError):
            return cause
        if isinstance(exc, DetbenchError) and type(exc).__module__.startswith("core."):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------- the evaluation


def evaluate_model_ray(path, settings: EvalSettings | None = None, *, ray_settings: RaySettings | None = None,
                       progress: ProgressCallback | None = None, store: bool = True, **options) -> EvalResult:
    """:func:`eval.coco.evaluate_model` with the images run on a Ray cluster (see the module docstring).

    ``settings``/``options`` mean what they mean there, with ``threads`` the intra-op
    threads of each actor's session (default 1) and the CPUs each actor reserves;
    ``workers``/``prefetch`` (the local loop's decode threads) do not apply, and
    ``allow_fallback`` is refused. ``ray_settings`` says where and how wide.
    ``EvalResult.settings["ray"]`` records the pool (actors, threads, batch size), the
    hosts that ran images and the retry options. Raises what ``evaluate_model`` raises,
    and :class:`ConfigError` when the cluster cannot be joined.
    """
    from exporters.quantize import check_calibration_overlap
    from runtime.backends import REFERENCE, get_backend

    unknown = set(options) - {f.name for f in dataclasses.fields(EvalSettings)}
    if unknown:
        raise ConfigError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    settings = dataclasses.replace(settings or EvalSettings(), **options)
    cluster = ray_settings or RaySettings()
    if settings.allow_fallback:
        raise ConfigError("--allow-fallback does not apply with --ray: nodes could fall back to different "
                          "devices; run on a backend every node has")
    threads = settings.threads if settings.threads is not None else 1
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be at least 1")
    started = time.perf_counter()
    path = Path(path)
    contract = model_contract(path, settings.overrides)
    model_bytes = path.read_bytes()
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    dataset = load_coco(settings.coco_dir, settings.annotations, settings.images)
    selection = dataset.select(settings.limit, settings.image_ids)
    check_calibration_overlap(contract, [img.id for img in selection], allow=settings.allow_calibration_overlap)
    dataset.check_images_present(selection)
    label_map = dataset.label_map(contract.label_space)
    provider_name = get_backend(settings.provider).name

    skipped: list[dict[str, str]] = []
    skipped_ids: set[int] = set()
    session_seconds = 0.0
    hosts: set[str] = set()
    load_seconds = 0.0
    with ray_instance(cluster.address) as resources:
        import ray

        gpu = get_backend(provider_name).capabilities.on_accelerator  # one device per actor
        actors = _pool_size(cluster, threads, resources, gpu)
        model_ref = ray.put(model_bytes)
        probe = None
        if provider_name != REFERENCE:  # the cache of any other backend is keyed by the precision it runs
            remote = ray.remote(_probe).options(num_cpus=threads, num_gpus=1 if gpu else 0, max_retries=TASK_MAX_RETRIES)
            try:
                probe = ray.get(remote.remote([model_ref], model_sha, settings.provider, threads, settings.parity))
            except Exception as exc:
                cause = _detbench_cause(exc)
                if cause is not None:
                    raise cause from None
                raise
        fingerprint, cache_path, results_path = eval_files(path, model_sha, provider_name, contract, dataset,
                                                           settings.results_file, settings.cache_file)
        if probe is not None:
            fingerprint["precision"] = probe["precision"]
        expected = probe and {k: probe[k] for k in ("provider", "precision", "providers_ran")}
        with DetectionCache(cache_path, fingerprint).open(settings.resume) as cache:
            selected_ids = {img.id for img in selection}
            resumed = sum(1 for i in cache.done if i in selected_ids)
            todo = [img for img in selection if img.id not in cache.done]
            loop_start = time.perf_counter()
            finished = resumed

            def report(image: str | None) -> None:
                if progress is not None:
                    progress(EvalProgress(finished, len(selection), resumed, len(skipped), image,
                                          time.perf_counter() - loop_start, session_seconds))

            report(None)
            if todo:
                batches = _detections(todo, model_ref, model_sha, settings.provider, threads, contract, label_map,
                                      cluster, actors, gpu)
                try:
                    for batch in batches:
                        for k in range(len(batch["image_id"])):
                            if batch["failure"][k]:
                                raise _failure(batch["failure"][k])
                            image_id, name = int(batch["image_id"][k]), str(batch["file_name"][k])
                            if image_id in cache.done or image_id in skipped_ids:
                                continue  # a retried block delivered twice
                            finished += 1
                            if batch["error"][k]:
                                skipped.append({"image_id": image_id, "file_name": name,
                                                "reason": str(batch["error"][k])})
                                skipped_ids.add(image_id)
                                report(name)
                                continue
                            identity = json.loads(batch["identity"][k])
                            if expected is None:
                                expected = identity
                            elif identity != expected:
                                raise ProviderUnavailableError(
                                    f"an actor on {batch['host'][k]} ran {identity}, where the others ran "
                                    f"{expected}; nodes must run the same backend the same way")
                            spent = float(batch["session_seconds"][k])
                            session_seconds += spent
                            hosts.add(str(batch["host"][k]))
                            load_seconds = max(load_seconds, float(batch["load_seconds"][k]))
                            cache.add(image_id, json.loads(batch["detections"][k]), spent)
                            report(name)
                except Exception as exc:
                    cause = _detbench_cause(exc)
                    if cause is not None and cause is not exc:
                        raise cause from None
                    raise
                finally:
                    batches.close()  # stops the pipeline (and frees the actors' CPUs) on any interruption
            loop_seconds = time.perf_counter() - loop_start
        del model_ref
        nodes = sum(1 for key in resources if key.startswith("node:") and key != "node:__internal_head__")

    image_ids = settings.image_ids
    run_settings = {
        "limit": settings.limit, "image_ids": sorted(int(i) for i in image_ids) if image_ids is not None else None,
        "resume": settings.resume, "threads": threads, "overrides": dict(settings.overrides or {}),
        "backend": settings.backend, "session": probe["session"] if probe else None,
        "runtime": probe["runtime"] if probe else None, "precision": (expected or {}).get("precision"),
        "parity": probe["parity"] if probe else None,
        "ray": {"address": cluster.address or "local", "actors": actors, "threads_per_actor": threads,
                "batch_size": cluster.batch_size, "nodes": nodes, "hosts": sorted(hosts),
                "actor_max_restarts": ACTOR_MAX_RESTARTS, "actor_max_task_retries": ACTOR_MAX_TASK_RETRIES,
                "task_max_retries": TASK_MAX_RETRIES},
    }
    return finish_evaluation(
        path=path, contract=contract, model_sha=model_sha, provider_name=provider_name,
        providers_ran=(expected or {}).get("providers_ran") or [provider_name], dataset=dataset, selection=selection,
        done=cache.done, skipped=skipped, resumed=resumed, started=started, loop_seconds=loop_seconds,
        session_seconds=session_seconds, session_create_seconds=load_seconds, results_path=results_path,
        cache_path=cache_path, backend=settings.backend, per_category=settings.per_category, settings=run_settings,
        store=store)


def _detections(todo: list[CocoImage], model_ref, model_sha: str, provider: str, threads: int,
                contract: ModelContract, label_map: np.ndarray, cluster: RaySettings, actors: int, gpu: bool):
    """The Ray Data pipeline over ``todo``: a generator of output batches (close it to stop the pipeline)."""
    import logging

    import ray.data
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    # library code never prints: no progress bars, execution plans or per-run notices on the driver's terminal
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    data_logger.setLevel(logging.ERROR)
    records = [{"image_id": img.id, "file_name": img.file_name, "width": img.width, "height": img.height,
                "path": str(img.path)} for img in todo]
    try:
        with warnings.catch_warnings():
            # Ray 2.60 announces that retry options passed as remote args will move (2.64); in this version
            # they are the way to set them.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            data = ray.data.from_items(records, override_num_blocks=math.ceil(len(records) / cluster.batch_size))
            data = data.map_batches(_prepare_batch, batch_size=None, batch_format="numpy",
                                    fn_kwargs={"contract": contract}, num_cpus=0,
                                    compute=TaskPoolStrategy(size=PREPARE_TASKS_PER_ACTOR * actors),
                                    max_retries=TASK_MAX_RETRIES)
            data = data.map_batches(_Detector, batch_size=None, batch_format="numpy",
                                    fn_constructor_kwargs={"model": [model_ref], "model_sha": model_sha,
                                                           "provider": provider, "threads": threads,
                                                           "contract": contract, "label_map": label_map},
                                    compute=ActorPoolStrategy(size=actors), num_cpus=threads,
                                    num_gpus=1 if gpu else None, max_restarts=ACTOR_MAX_RESTARTS,
                                    max_task_retries=ACTOR_MAX_TASK_RETRIES)
        iterator = iter(data.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            yield from iterator
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        data_logger.setLevel(saved_level)
