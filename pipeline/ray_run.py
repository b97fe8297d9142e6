"""``run --ray``: the steps of the run matrix as Ray tasks; the driver keeps the bookkeeping.

The driver (``pipeline.run._Pipeline``) still decides every step: what to reuse (the run
manifest), in which order, and it is still the only process that writes the manifest and
the results store. What moves to the cluster is each step's measuring function
(``pipeline.run._export_file``, ``_quantize_file``, ``_profile_file``, ``_bench_file``,
``_images_file``): it runs as a Ray task (:func:`_task`) and returns its value, the
records it would have written and the worker's :func:`core.store.host_info`; the driver
writes the records naming that host. Evaluation runs through :func:`eval.ray_eval.
evaluate_model_ray` on the same cluster (images on the workers, scoring on the driver).

Concurrency: the targets of one model run in order (the INT8 row quantizes the float
export), the models side by side, one driver thread each (:meth:`RayRun.run_targets`).

Files: an export or quantize task writes into a temporary folder on its worker and
returns the file's bytes; the driver writes them at the usual place under
``results/onnx/`` and puts them in the object store once; a later task's worker turns
them into a node-local file (:func:`eval.ray_eval._node_model_file`, the same per-node
copy ``eval --ray`` uses). No shared filesystem is needed for models; the COCO folder and
the weights files must be at the same path on every node.

Timing: bench and per-image steps ask for the custom resource :data:`BENCH_RESOURCE`
(one per node: the local instance advertises it, cluster nodes with ``ray start
--resources '{"detbench_bench": 1}'``) and for all the CPUs of a bench node, so no
other task shares the node while they time. Evaluations and timing steps are also kept
apart on the driver (``eval --ray``'s decode tasks ask for no CPU, and its scoring runs
in the driver's process).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core.contract import sha256_file
from core.files import write_bytes_atomic
from core.errors import ClusterLostError, ConfigError, DetbenchError

BENCH_RESOURCE = "detbench_bench"
# A worker process that dies (node lost, out of memory) has its task run again; a step's own
# failure is not retried (it is recorded as the step's failure, as in a local run).
TASK_MAX_RETRIES = 3
# How often a waiting step checks that some live node can still run it.
NODE_CHECK_SECONDS = 5.0


class _Stopped(BaseException):
    """The driver is stopping (interrupted): no new step starts. Not an Exception, so no step records it."""


@dataclass
class RayRun:
    """Where ``run --ray`` runs: ``address`` None starts a local Ray instance (this machine's CPUs,
    one :data:`BENCH_RESOURCE`, no dashboard) for the run; ``auto`` or ``HOST:PORT`` joins a
    running cluster. A Ray instance this process already started is used as it is."""

    address: str | None = None
    connect_timeout: float = 30.0  # seconds for the cluster's address to answer (--ray-timeout)
    bench_cpus: int = 0  # CPUs a timing task reserves: the smallest bench node's (found on connecting)
    _refs: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _timing: "_Exclusion" = field(default_factory=lambda: _Exclusion(), repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self):
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout > 0):
            raise ConfigError(f"--ray-timeout {self.connect_timeout}: must be a number of seconds above 0")
        if self.address is not None and not self.address.strip():
            raise ConfigError("--ray-address is empty: give auto or HOST:PORT (or leave it out for a local instance)")

    # ------------------------------------------------------------------ the cluster

    @contextlib.contextmanager
    def connected(self) -> Iterator[None]:
        """Ray connected for the block (started and stopped here when it was not running)."""
        import ray

        from eval.ray_eval import ray_instance

        with ray_instance(self.address, connect_timeout=self.connect_timeout, resources={BENCH_RESOURCE: 1}):
            try:
                cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes()
                        if n.get("Alive") and n["Resources"].get(BENCH_RESOURCE)]
                if not cpus:
                    raise ConfigError(f"no node of the Ray cluster advertises the {BENCH_RESOURCE} resource that "
                                      f"bench steps hold; start bench nodes with `ray start ... --resources "
                                      f"'{{\"{BENCH_RESOURCE}\": 1}}'`")
                self.bench_cpus = max(1, int(min(cpus)))
                self._stopping.clear()
                yield
            finally:
                self._refs.clear()

    def run_targets(self, pipe, targets: list, backends: dict[str, str]) -> None:
        """Each model's targets in order on a driver thread of its own, the models side by side."""
        groups: dict[str, list] = {}
        for target in targets:
            groups.setdefault(target.spec.name, []).append(target)

        def run_group(group):
            for target in group:
                pipe.run_target(target, backends)

        pool = ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="detbench-run")
        futures = [pool.submit(run_group, group) for group in groups.values()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            self._stopping.set()  # the other threads end at their next step; the steps done are recorded
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ steps

    def call(self, fn, args: tuple, kwargs: dict, *, model: Path | None, produces: Path | None,
             exclusive: bool) -> tuple[Any, list[dict], dict]:
        """``fn`` as a Ray task (see the module docstring): (value, records, worker host).
        A produced file is written at ``produces`` here before this returns."""
        import ray

        if self._stopping.is_set():
            raise _Stopped()
        if model is not None:
            sha = sha256_file(model)
            model_arg = ([self._model_ref(model, sha)], sha, str(model))
        else:
            model_arg = None
        options: dict[str, Any] = {"max_retries": TASK_MAX_RETRIES, "num_cpus": 1}
        if exclusive:
            options.update(num_cpus=self.bench_cpus, resources={BENCH_RESOURCE: 1})
        remote = ray.remote(_task).options(**options)
        with self._timing.timing() if exclusive else contextlib.nullcontext():
            out = _wait(remote.remote(fn, args, kwargs, model_arg, None if produces is None else str(produces)),
                        options, getattr(fn, "__name__", str(fn)))
        if "raise" in out:
            raise _rebuild(*out["raise"])
        if produces is not None:
            _write_bytes(produces, out["file"])
        return out["value"], out["records"], out["host"]

    def evaluate(self, path, **options):
        """:func:`eval.ray_eval.evaluate_model_ray` on this cluster, never while a timing step runs."""
        from eval.ray_eval import RaySettings, evaluate_model_ray

        if self._stopping.is_set():
            raise _Stopped()
        with self._timing.evaluation():
            return evaluate_model_ray(path, ray_settings=RaySettings(address=self.address), **options)

    def _model_ref(self, path: Path, sha: str):
        """The file's bytes in the object store, put once per content."""
        import ray

        with self._lock:
            if sha not in self._refs:
                self._refs[sha] = ray.put(Path(path).read_bytes())
            return self._refs[sha]


def _wait(ref, options: dict[str, Any], step: str) -> dict[str, Any]:
    """The task's value. Ray runs a task whose node died again elsewhere (``max_retries``); when
    no node still alive offers what it asks for, or the retries are spent, the run stops here
    with :class:`ClusterLostError` instead of waiting for ever (the steps done are recorded)."""
    import ray
    from ray import exceptions as rx

    needs = {"CPU": options.get("num_cpus", 1), **options.get("resources", {})}
    while True:
        ready, _ = ray.wait([ref], timeout=NODE_CHECK_SECONDS)
        if ready:
            try:
                return ray.get(ref)
            except (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError,
                    rx.LocalRayletDiedError) as exc:
                raise ClusterLostError(f"step {step}: Ray lost the worker running it {TASK_MAX_RETRIES + 1} times "
                                       f"({type(exc).__name__}); {_RERUN}") from None
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(all(res.get(k, 0) >= v for k, v in needs.items()) for res in alive):
            ray.cancel(ref, force=True)
            raise ClusterLostError(f"step {step}: no node left in the Ray cluster offers what it needs ({needs}); "
                                   f"{_RERUN}")


_RERUN = ("the steps already done are recorded: start nodes again and run the same `run` command, which continues "
          "where this one stopped")


# --------------------------------------------------------------------------- on the worker


def _task(fn, args: tuple, kwargs: dict, model, produces: str | None) -> dict[str, Any]:
    """Run a measuring function on this worker. Its own failures (detbench errors, a step that
    cannot run here) come back as values, so Ray does not retry them and the driver raises them
    as the class they are; the worker's paths in the records are replaced by the driver's."""
    from core.store import host_info

    host = host_info()
    swap: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="detbench-ray-run-") as tmp:
            if model is not None:
                from eval.ray_eval import _node_model_file

                refs, sha, driver_path = model
                local = _node_model_file(refs, sha)
                swap[str(local)] = driver_path
                args = (local, *args)
            if produces is not None:
                out = Path(tmp) / Path(produces).name
                swap[str(out)] = produces
                kwargs = {**kwargs, "out": out}
            value, records = fn(*args, **kwargs)
            data = out.read_bytes() if produces is not None else None
    except Exception as exc:
        if isinstance(exc, DetbenchError) or type(exc).__name__ == "_Skip":
            return {"raise": (type(exc).__module__, type(exc).__qualname__, str(exc)), "host": host}
        raise
    return {"value": _swap(value, swap), "records": _swap(records, swap), "file": data, "host": host}


def _swap(obj, mapping: dict[str, str]):
    """``obj`` with every string equal to a key of ``mapping`` (a worker path) replaced by its value."""
    if isinstance(obj, str):
        return mapping.get(obj, obj)
    if isinstance(obj, Path):
        return Path(mapping[str(obj)]) if str(obj) in mapping else obj
    if isinstance(obj, dict):
        return {k: _swap(v, mapping) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(v, mapping) for v in obj)
    return obj


def _rebuild(module: str, qualname: str, message: str) -> BaseException:
    """A worker's error as an instance of its own class (some take structured arguments: the message is composed)."""
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = DetbenchError
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


class _Exclusion:
    """Timing steps run side by side (Ray keeps them one per node); an evaluation runs alone:
    its decode tasks ask for no CPU (so Ray would place them beside a bench) and it scores on the driver."""

    def __init__(self):
        self._cond = threading.Condition()
        self._timing = 0
        self._evaluating = False

    @contextlib.contextmanager
    def timing(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._evaluating)
            self._timing += 1
        try:
            yield
        finally:
            with self._cond:
                self._timing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def evaluation(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._evaluating and self._timing == 0)
            self._evaluating = True
        try:
            yield
        finally:
            with self._cond:
                self._evaluating = False
                self._cond.notify_all()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file produced on a worker; a half-written file never takes the final name."""
    write_bytes_atomic(path, data)
