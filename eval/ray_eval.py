"""COCO evaluation on a Ray cluster: the same detections and scores as ``eval.coco``, from many processes.

The pipeline is Ray Data, streamed::

    driver: contract, dataset, selection, detection cache      (as eval.coco.evaluate_model)
      -> ray.data.from_items(image records, one block per batch)
      -> map_batches(_prepare_batch)      tasks: decode + resize (eval.image_feed.prepare_image)
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
import logging
import math
import os
import queue
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.contract import OUTPUT_NAMES, ModelContract
from core.errors import ClusterLostError, ConfigError, DetbenchError, ProviderUnavailableError
from core.files import atomic_file
from core.images import Placement
from eval.coco import (EvalProgress, EvalResult, EvalSettings, FinishedLoop, ProgressCallback, eval_files,
                       finish_evaluation, model_contract, to_coco_detections)
from eval.dataset import CocoImage, load_coco
from eval.labels import label_mapping
from eval.image_feed import DetectionCache, Prepared, prepare_image

# Bounded, not Ray Data's default of unbounded: a model that kills its process on every
# image would otherwise restart forever instead of failing the run.
ACTOR_MAX_RESTARTS = 4
ACTOR_MAX_TASK_RETRIES = 4
TASK_MAX_RETRIES = 4
# Times the pipeline is started again over the images not yet gathered after Ray lost a node
# (or an actor or block it could not bring back); one more loss stops the run (ClusterLostError).
PIPELINE_REISSUES = 3
# After a loss, how long the GCS may take to mark the node dead (Ray's health check: by default
# 5 missed checks of 3 s) before the surviving pool is sized.
LOSS_SETTLE_S = 30.0
# An inference pool whose actors cannot all be placed (the cluster shrank, or --ray-actors asks
# for more than it holds) stops waiting after this long and is re-issued at a size that fits.
ACTOR_START_TIMEOUT_S = 60.0
# While the driver waits for the pipeline's next batch it checks this often that some live node can
# still hold an inference actor; with none for NO_NODE_S seconds the run stops (ClusterLostError).
NODE_CHECK_S = 2.0
NO_NODE_S = 10.0
# An actor whose restart is pending this long while no batch arrives (its node was lost and no node
# has room for it: Ray Data would wait for ever) makes the run re-issue the images still missing.
RESTART_WAIT_S = 45.0
# How long closing the pipeline waits for the thread reading its batches.
READER_JOIN_S = 30.0
# Decoding and resizing is about a tenth of inference time per image for the registry's
# models: the prepare tasks ask for no logical CPU, so that the cluster's CPUs all go to
# the sessions' threads (what the actors are sized by), and at most this many run at once
# per actor.
PREPARE_TASKS_PER_ACTOR = 2
DEFAULT_BATCH_SIZE = 4
# How long joining a cluster may take before the run stops saying so (--ray-timeout).
CONNECT_TIMEOUT_S = 30.0
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
    retried and cached at once. ``connect_timeout``: seconds to wait for the cluster's
    address to answer before the run stops (a dead address is refused at once).
    """

    address: str | None = None
    actors: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    connect_timeout: float = CONNECT_TIMEOUT_S

    def __post_init__(self):
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors {self.actors}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--ray-batch {self.batch_size}: must be at least 1")
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout > 0):
            raise ConfigError(f"--ray-timeout {self.connect_timeout}: must be a number of seconds above 0")
        if self.address is not None and not self.address.strip():
            raise ConfigError("--ray-address is empty: give auto or HOST:PORT (or leave it out for a local instance)")


# --------------------------------------------------------------------------- the Ray instance


@contextlib.contextmanager
def ray_instance(address: str | None, *, connect_timeout: float = CONNECT_TIMEOUT_S,
                 resources: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Ray connected for the duration of the block; yields the cluster's resources.

    See :class:`RaySettings` for ``address``; ``resources`` are custom resources a local
    instance advertises. A local instance listens on the loopback interface only, and a
    loopback ``address`` is connected to as given (:func:`loopback_only`). Raises
    :class:`ConfigError` naming the address when nothing answers there within
    ``connect_timeout`` seconds, or when the cluster cannot be joined.
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                                  configure_logging=False)
    if address is None:
        root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs.update(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1",
                      runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, resources=dict(resources or {}))
        loopback = True
    else:
        host = _probe_address(address, connect_timeout)
        kwargs.update(address=address)
        loopback = host is not None and _is_loopback(host)
    before = {t.ident for t in threading.enumerate()}
    with loopback_only(loopback), _environment({USAGE_STATS_ENV: "0"}):
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            if address is None:
                raise ConfigError(f"--ray: a local Ray instance did not start ({exc}); see Ray's logs under "
                                  f"{tempfile.gettempdir()}/ray/session_latest/logs") from exc
            raise ConfigError(f"--ray-address {address}: cannot join a Ray cluster there ({exc}); start one with "
                              "`ray start --head` on the head node, or leave --ray-address out to run on a local "
                              "instance") from exc
        try:
            yield ray.cluster_resources()
        finally:
            left = settle_threads(before)
            if left:
                logging.getLogger(__name__).warning("threads still inside Ray when disconnecting: %s", left)
            ray.shutdown()


# Ray's usage statistics: on by default, they send the cluster's description over the network and
# keep a Ray Data poller thread for the process's life; a detbench run stays off the network.
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
# Threads that belong to the connection itself and end with ray.shutdown().
_CONNECTION_THREADS = frozenset({"PythonGCThread", "ray_listen_error_messages", "ray_print_logs"})
# How long disconnecting waits for the threads a block started to end.
SETTLE_S = 10.0


def settle_threads(before: set[int], timeout: float = SETTLE_S) -> list[str]:
    """Wait up to ``timeout`` s for the threads started since ``before`` (thread idents) to end;
    the names of those still alive. Garbage is collected first: a Ray Data iterator left in a
    reference cycle stops its prefetch thread only when collected. A thread still inside Ray
    when the driver disconnects aborts the whole process (the core worker is gone under it)."""
    import gc

    gc.collect()
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.ident in before or t is threading.current_thread() or t.name in _CONNECTION_THREADS:
            continue
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in threading.enumerate()
                  if t.ident not in before and t.is_alive() and t.name not in _CONNECTION_THREADS)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (inherited by what it starts) for the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _probe_address(address: str, timeout: float) -> str | None:
    """The host of ``HOST:PORT`` once something accepts a TCP connection there (None for ``auto``).

    Ray itself retries a dead address for minutes, in calls that do not see Ctrl-C; this
    plain connect answers at once when nothing listens, within ``timeout`` seconds when
    nothing answers at all, and is interruptible.
    """
    if address == "auto":
        return None
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--ray-address {address}: give auto or HOST:PORT (the head node's GCS address, "
                          "6379 unless `ray start --head --port` said otherwise)")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout) as conn:
            # A GCS is a gRPC server: it answers the HTTP/2 preface with a SETTINGS frame (type 4).
            # Anything else listening there would keep Ray retrying for minutes.
            conn.sendall(_HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            header = b""
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except socket.timeout:
        raise ConfigError(f"--ray-address {address}: nothing answered there within {timeout:g} s "
                          "(--ray-timeout); check the head node's address and port and that a firewall lets "
                          "them through") from None
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: no Ray cluster there ({exc.strerror or exc}); start one with "
                          "`ray start --head` on that node (see docs/scale.md), or leave --ray-address out to run "
                          "on a local instance") from None
    if len(header) < 9 or header[3] != 4:
        raise ConfigError(f"--ray-address {address}: something listens there but it is not a Ray cluster's GCS "
                          "(it did not answer as a gRPC server); give the head node's GCS port (6379 unless "
                          "`ray start --head --port` said otherwise)")
    return host


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@contextlib.contextmanager
def loopback_only(on: bool = True) -> Iterator[None]:
    """While ``on``: Ray keeps 127.0.0.1 as the node address instead of replacing it by the
    machine's interface address, so a local instance's servers listen on loopback only.

    Ray 2.60 decides this with one switch, ``ENABLE_RAY_CLUSTER`` (environment variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, off by default only on Windows and macOS): off,
    ``resolve_ip_for_localhost`` leaves a loopback address alone, and the GCS, raylet,
    object manager and workers then bind to it. The module constant is read at each call
    and the variable by the processes the instance starts, so both are set for the block.
    """
    if not on:
        yield
        return
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(name))
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[name] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[1]


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
    # Actors on one node may write at once: each writes its own temporary file and renames.
    with atomic_file(target, "wb") as fh:
        fh.write(data)
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
        self.node = _node_id()
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
                "node": np.array([self.node] * n, dtype=object),
                "identity": np.array([self.identity] * n, dtype=object),
                "load_seconds": np.full(n, self.load_seconds), "failure": np.array([failure] * n, dtype=object)}


def _node_id() -> str:
    """The Ray node this process runs on (several nodes can share a host name)."""
    import ray

    return ray.get_runtime_context().get_node_id()


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
    from core.calibration import check_calibration_overlap
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
    mapping = label_mapping(dataset, contract.label_space, contract.labels)
    label_map = mapping.table
    provider_name = get_backend(settings.provider).name

    skipped: list[dict[str, str]] = []
    skipped_ids: set[int] = set()
    session_seconds = 0.0
    hosts: set[str] = set()
    image_nodes: dict[str, list[int]] = {}
    reissues: list[str] = []
    load_seconds = 0.0
    with ray_instance(cluster.address, connect_timeout=cluster.connect_timeout) as resources:
        import ray

        gpu = get_backend(provider_name).capabilities.on_accelerator  # one device per actor
        actors = _pool_size(cluster, threads, resources, gpu)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))  # nodes on one host share a node:IP resource
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
            loop_start = time.perf_counter()
            finished = resumed

            def report(image: str | None) -> None:
                if progress is not None:
                    progress(EvalProgress(finished, len(selection), resumed, len(skipped), image,
                                          time.perf_counter() - loop_start, session_seconds))

            report(None)

            def gather(batch) -> None:
                nonlocal finished, expected, session_seconds, load_seconds
                for k in range(len(batch["image_id"])):
                    if batch["failure"][k]:
                        raise _failure(batch["failure"][k])
                    image_id, name = int(batch["image_id"][k]), str(batch["file_name"][k])
                    if image_id in cache.done or image_id in skipped_ids:
                        continue  # a retried block delivered twice
                    finished += 1
                    if batch["error"][k]:
                        skipped.append({"image_id": image_id, "file_name": name, "reason": str(batch["error"][k])})
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
                    image_nodes.setdefault(str(batch["node"][k]), []).append(image_id)
                    load_seconds = max(load_seconds, float(batch["load_seconds"][k]))
                    cache.add(image_id, json.loads(batch["detections"][k]), spent)
                    report(name)

            def missing() -> int:
                return sum(1 for img in selection if img.id not in cache.done and img.id not in skipped_ids)

            pool = actors
            checked_nodes: set[str] = set()
            while True:
                todo = [img for img in selection if img.id not in cache.done and img.id not in skipped_ids]
                if not todo:
                    break
                nodes_before = _alive_nodes()
                _check_images_on_nodes(todo, nodes_before - checked_nodes)
                checked_nodes |= nodes_before
                detector = {"model": [model_ref], "model_sha": model_sha, "provider": settings.provider,
                            "threads": threads, "contract": contract, "label_map": label_map}
                pipeline = _Pipeline(todo, detector, cluster, pool, gpu)
                try:
                    for batch in pipeline.batches():
                        gather(batch)
                    break
                except Exception as exc:
                    cause = _detbench_cause(exc)
                    if cause is not None and cause is not exc:
                        raise cause from None
                    if cause is not None or not _lost_to_the_cluster(exc):
                        raise
                    # Ray lost a node, or an actor or block it could not bring back: what was gathered
                    # stays in the cache, and the images still missing are issued again to a pool
                    # sized for the nodes that remain.
                    reissues.append(_loss_summary(exc))
                    _settle(nodes_before)
                    pool = _surviving_pool(actors, threads, gpu)
                    if len(reissues) > PIPELINE_REISSUES or pool < 1:
                        raise ClusterLostError(_stopped_message(reissues, pool, missing(), path, settings,
                                                                cluster, cache_path)) from None
                finally:
                    pipeline.close()  # stops the pipeline (and frees the actors' CPUs) on any interruption
            loop_seconds = time.perf_counter() - loop_start
        del model_ref

    image_ids = settings.image_ids
    run_settings = {
        "limit": settings.limit, "image_ids": sorted(int(i) for i in image_ids) if image_ids is not None else None,
        "resume": settings.resume, "threads": threads, "overrides": dict(settings.overrides or {}),
        "backend": settings.backend, "session": probe["session"] if probe else None,
        "runtime": probe["runtime"] if probe else None, "precision": (expected or {}).get("precision"),
        "parity": probe["parity"] if probe else None, "label_mapping": mapping.to_dict(),
        "ray": {"address": cluster.address or "local", "actors": actors, "threads_per_actor": threads,
                "batch_size": cluster.batch_size, "nodes": nodes, "hosts": sorted(hosts),
                "image_nodes": {node: sorted(ids) for node, ids in sorted(image_nodes.items())},
                "reissued_after": reissues, "pipeline_reissues": PIPELINE_REISSUES,
                "actor_max_restarts": ACTOR_MAX_RESTARTS, "actor_max_task_retries": ACTOR_MAX_TASK_RETRIES,
                "task_max_retries": TASK_MAX_RETRIES},
    }
    return finish_evaluation(FinishedLoop(
        path=path, contract=contract, model_sha=model_sha, provider_name=provider_name,
        providers_ran=(expected or {}).get("providers_ran") or [provider_name], dataset=dataset, selection=selection,
        done=cache.done, skipped=skipped, resumed=resumed, started=started, loop_seconds=loop_seconds,
        session_seconds=session_seconds, session_create_seconds=load_seconds, results_path=results_path,
        cache_path=cache_path, backend=settings.backend, per_category=settings.per_category, settings=run_settings),
        store=store)


def _lost_to_the_cluster(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is Ray losing a process, node or object, not code failing."""
    from ray import exceptions as rx

    lost = (rx.ActorDiedError, rx.ActorUnavailableError, rx.ObjectLostError, rx.NodeDiedError,
            rx.WorkerCrashedError, rx.OwnerDiedError, rx.RaySystemError, rx.LocalRayletDiedError, _Stalled)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, lost) or isinstance(getattr(exc, "cause", None), lost):
            return True
        if isinstance(exc, rx.GetTimeoutError) and "starting actors" in str(exc):
            return True  # the pool did not fit in ACTOR_START_TIMEOUT_S
        exc = exc.__cause__ or exc.__context__
    return False


def _images_missing_here(paths: list[str]) -> dict[str, Any]:
    """On one node: how many of ``paths`` are not files there, and the first such."""
    missing = [p for p in paths if not os.path.isfile(p)]
    return {"missing": len(missing), "first": missing[0] if missing else None, "host": socket.gethostname(),
            "ip": _node_ip()}


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _check_images_on_nodes(todo: list[CocoImage], nodes: set[str]) -> None:
    """Every node in ``nodes`` sees the images the driver sees, at the same paths (the prepare tasks
    read them by path there); raises :class:`DatasetError` naming the first node that does not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from core.errors import DatasetError

    # what the driver lacks it reports itself; absolute, as the prepare tasks get them (_Pipeline)
    paths = [os.path.abspath(img.path) for img in todo if img.path.is_file()]
    if not paths or not nodes:
        return
    check = ray.remote(_images_missing_here)
    refs = {node: check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(paths) for node in sorted(nodes)}
    for node, ref in refs.items():
        try:
            seen = ray.get(ref, timeout=ACTOR_START_TIMEOUT_S)
        except Exception as exc:  # the node went away meanwhile: the pipeline's loss handling takes it from here
            if _lost_to_the_cluster(exc) or isinstance(exc, ray.exceptions.GetTimeoutError):
                continue
            raise
        if seen["missing"]:
            folder = Path(seen["first"]).parent
            raise DatasetError(
                f"Ray node {node[:12]} ({seen['host']}, {seen['ip']}) lacks {seen['missing']} of the {len(paths)} "
                f"images at the driver's paths (first: {seen['first']}): every node must see the COCO images at "
                f"the same path ({folder}); mount or copy them there (docs/scale.md, cluster quick start)")


def _restarting_actors() -> set[str]:
    """Ids of this driver's actors that Ray is restarting (their process or node was lost)."""
    import ray
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return {a["ActorID"] for a in state.actors(job_id=job, actor_state_name="RESTARTING").values()}


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _settle(before: set[str]) -> None:
    """Wait (at most :data:`LOSS_SETTLE_S`) until the GCS has marked a lost node dead, so the
    pool that takes over is sized for the nodes that really remain. An actor lost without
    its node does not end the wait early; its pool may then be too large for a while, which
    the actor start timeout (:data:`ACTOR_START_TIMEOUT_S`) turns into one more re-issue."""
    deadline = time.monotonic() + LOSS_SETTLE_S
    while before <= _alive_nodes() and time.monotonic() < deadline:
        time.sleep(1.0)


def _loss_summary(exc: BaseException) -> str:
    """One line naming what Ray lost (the first line of its message)."""
    if isinstance(exc, _Stalled):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _surviving_pool(asked: int, threads: int, gpu: bool) -> int:
    """Actors the nodes still alive can hold: the pool asked for, at most what their CPUs (or GPUs) fit."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpu:
        fit = sum(int(r.get("GPU", 0)) for r in alive)
    else:
        fit = sum(int(r.get("CPU", 0) // threads) for r in alive)
    return min(asked, fit)


def _stopped_message(reissues: list[str], pool: int, missing: int, path: Path, settings: EvalSettings,
                     cluster: RaySettings, cache_path: Path) -> str:
    why = (f"no node left in the cluster can hold an inference actor ({settings.threads or 1} CPU(s) each)"
           if pool < 1 else f"the cluster lost work {len(reissues)} times (at most {PIPELINE_REISSUES} re-issues)")
    resume = ["python", "cli.py", "eval", str(path)]
    if settings.coco_dir is not None:
        resume += ["--coco", str(settings.coco_dir)]
    resume += ["--ray", "--resume", "--cache", str(cache_path)]
    if settings.provider != "cpu":
        resume += ["--provider", settings.provider]
    if settings.threads is not None:
        resume += ["--threads", str(settings.threads)]
    if cluster.address:
        resume += ["--ray-address", cluster.address]
    if settings.limit is not None:
        resume += ["--limit", str(settings.limit)]
    if settings.results_file is not None:
        resume += ["--out", str(settings.results_file)]
    return (f"the Ray evaluation stopped with {missing} image(s) not evaluated: {why}; last loss: {reissues[-1]}. "
            f"The images already evaluated are kept in the detection cache; once the cluster has nodes again, "
            f"continue with: {' '.join(resume)}")


class _Stalled(Exception):
    """The pipeline cannot progress and Ray raises nothing: no live node can hold an inference actor, or
    an actor's restart has been pending too long (see :class:`_Pipeline`). Handled as a loss."""


class _Pipeline:
    """The Ray Data pipeline over ``todo``, its output batches read on a thread of their own.

    Ray Data can wait for ever after a node is lost: an actor that lived there is restarted
    (``max_restarts``) but its restart stays pending when no node has room for it, and so
    does the batch it held, with no error raised (the driver then waits on the executor's
    output queue, or on a block whose object went with the node). So a thread reads the
    batches, and the driver, whenever no batch came for :data:`NODE_CHECK_S` seconds, asks
    the GCS whether some live node can still hold an actor and whether an actor of this run
    is restarting. :meth:`batches` raises :class:`_Stalled` when no node could hold one for
    :data:`NO_NODE_S` seconds, or an actor has been restarting for :data:`RESTART_WAIT_S`
    seconds; the caller then re-issues the missing images to a pool sized for the nodes
    alive, or stops with the ``--resume`` command when there are none. :meth:`close` stops
    the pipeline: Ray Data's executor is shut down with its actors killed (which also ends
    a read waiting on them) and the reader is joined.
    """

    def __init__(self, todo: list[CocoImage], detector: dict[str, Any], cluster: RaySettings, actors: int, gpu: bool):
        """``detector``: the inference actors' constructor arguments (:class:`_Detector`)."""
        import logging

        import ray.data
        from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

        from eval import ray_executors

        threads = detector["threads"]
        self.threads, self.gpu = threads, gpu
        self._tag = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        context = DataContext.get_current()
        saved = (context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s,
                 context.custom_execution_callback_classes, context.get_config(ray_executors.PIPELINE_KEY))
        self._restore = (context, saved)
        self._logger = logging.getLogger("ray.data")
        self._logger_level = self._logger.level
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        # library code never prints: no progress bars, execution plans or per-run notices on the driver's terminal
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.custom_execution_callback_classes = [*saved[3], ray_executors.ExecutorsStarted]
        context.set_config(ray_executors.PIPELINE_KEY, self._tag)  # which executors close() stops
        # ERROR would still print Ray Data's traceback of a lost actor that the caller survives or reports
        # (until close: the pipeline runs while the batches are read)
        self._logger.setLevel(logging.CRITICAL)
        # absolute: a worker runs in its raylet's folder, not the driver's (a relative --coco would name nothing there)
        records = [{"image_id": img.id, "file_name": img.file_name, "width": img.width, "height": img.height,
                    "path": os.path.abspath(img.path)} for img in todo]
        try:
            with warnings.catch_warnings():
                # Ray 2.60 announces that retry options passed as remote args will move (2.64); in this version
                # they are the way to set them.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                data = ray.data.from_items(records, override_num_blocks=math.ceil(len(records) / cluster.batch_size))
                data = data.map_batches(_prepare_batch, batch_size=None, batch_format="numpy",
                                        fn_kwargs={"contract": detector["contract"]}, num_cpus=0,
                                        compute=TaskPoolStrategy(size=PREPARE_TASKS_PER_ACTOR * actors),
                                        max_retries=TASK_MAX_RETRIES)
                # a Dataset keeps the context it was made with: the settings above hold for it alone
                self._data = data.map_batches(
                    _Detector, batch_size=None, batch_format="numpy",
                    fn_constructor_kwargs=detector,
                    compute=ActorPoolStrategy(size=actors), num_cpus=threads, num_gpus=1 if gpu else None,
                    max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES)
        except BaseException:
            self._logger.setLevel(self._logger_level)
            raise
        finally:
            context, saved = self._restore
            (context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s,
             context.custom_execution_callback_classes) = saved[:4]
            if saved[4] is None:
                context.remove_config(ray_executors.PIPELINE_KEY)
            else:
                context.set_config(ray_executors.PIPELINE_KEY, saved[4])
        self._out: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The output batches as they arrive; raises what the pipeline raised, or :class:`_Stalled`."""
        self._reader = threading.Thread(target=self._read, name="detbench-ray-batches", daemon=True)
        self._reader.start()
        no_node_since = None
        restarting_since: dict[str, float] = {}  # actor id -> when first seen restarting
        while True:
            try:
                kind, item = self._out.get(timeout=NODE_CHECK_S)
            except queue.Empty:
                now = time.monotonic()
                if _surviving_pool(1, self.threads, self.gpu) >= 1:
                    no_node_since = None
                else:
                    no_node_since = now if no_node_since is None else no_node_since
                    if now - no_node_since >= NO_NODE_S:
                        raise _Stalled(f"no live node could hold an inference actor for {NO_NODE_S:g} s") from None
                restarting = _restarting_actors()
                restarting_since = {a: restarting_since.get(a, now) for a in restarting}
                if restarting_since and now - min(restarting_since.values()) >= RESTART_WAIT_S:
                    raise _Stalled(f"an inference actor's restart was pending for {RESTART_WAIT_S:g} s with no "
                                   "batch delivered (no node had room for it)") from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            no_node_since = None
            restarting_since.clear()
            yield item

    def _read(self) -> None:
        iterator = iter(self._data.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in iterator:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the driver's thread, which raises it
            self._put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the pipeline (its actors' CPUs are free again) and the reader."""
        from eval import ray_executors

        self._stop.set()
        for executor in ray_executors.take(self._tag):
            executor.shutdown(force=True)
        if self._reader is not None:
            self._reader.join(timeout=READER_JOIN_S)  # a reader Ray still holds ends when the driver disconnects
        for executor in ray_executors.take(self._tag):  # one the reader started meanwhile
            executor.shutdown(force=True)
        self._logger.setLevel(self._logger_level)
