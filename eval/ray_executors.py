"""The Ray Data executors a pipeline of ``eval.ray_eval`` started, so that the driver can stop them.

Ray Data makes its execution callbacks from classes named in the Dataset's ``DataContext``,
without arguments, and ships that context to the workers: the class must be importable by
name there (a class made inside a function would be pickled by value, with what it holds).
This module imports Ray Data, so ``eval.ray_eval`` imports it only when it builds a pipeline.
"""

from __future__ import annotations

import threading

from ray.data._internal.execution.execution_callback import ExecutionCallback

# the DataContext key naming the pipeline a Dataset belongs to
PIPELINE_KEY = "detbench_pipeline"
_started: dict[str, list] = {}
_lock = threading.Lock()


class ExecutorsStarted(ExecutionCallback):
    """Records each executor a tagged Dataset starts (on the driver, where they run)."""

    def before_execution_starts(self, executor) -> None:
        tag = executor._data_context.get_config(PIPELINE_KEY)
        if tag is not None:
            with _lock:
                _started.setdefault(tag, []).append(executor)


def take(tag: str) -> list:
    """The executors started for ``tag`` so far, forgotten here."""
    with _lock:
        return _started.pop(tag, [])
