"""How idle threads wait while several runtimes alternate in one process.

OpenMP runtimes (GNU libgomp in PyTorch, ncnn and OpenCV; LLVM/Intel libomp) keep idle threads
spinning for a while after each parallel region: alternating with another runtime, those threads
busy-wait on the cores the timed runtime needs. Measured on yolov3-416 (2 cores, loaded host,
``benchmarks/fair_alternation.py``): onnx2torch alternating with onnxruntime and OpenVINO took
4.09x onnxruntime CPU, 1.57x with ``OMP_WAIT_POLICY=PASSIVE``; ncnn's own ``openmp_blocktime = 0``
did not stop its threads spinning, the environment variable did. The variable is read once, when
the OpenMP runtime is loaded, so it has to be in the environment before any library linking one
is imported: no backend setting can do it afterwards.
"""

from __future__ import annotations

import os

OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")


def loaded_openmp(maps: str | None = None) -> list[str]:
    """The OpenMP runtime libraries already mapped into this process (Linux; [] elsewhere)."""
    if maps is None:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                maps = fh.read()
        except OSError:
            return []
    found = set()
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1].strip()
        if name.startswith(_OPENMP_LIBRARIES) and ".so" in name:
            found.add(name)
    return sorted(found)


def passive_openmp() -> dict[str, object]:
    """Ask the OpenMP runtimes this process has not loaded yet to put idle threads to sleep at once
    (``OMP_WAIT_POLICY=PASSIVE``, unless the user set the variable). What holds, for the record:
    the policy in the environment, whether it applies to every OpenMP runtime of the process,
    and the libraries loaded before it was set (those keep their own policy)."""
    before = loaded_openmp()
    asked = os.environ.get(OMP_WAIT_POLICY)
    if asked is None:
        os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    policy = os.environ[OMP_WAIT_POLICY]
    late = before if asked is None else []
    return {"omp_wait_policy": policy, "set_by": "user" if asked is not None else "detbench",
            "applies": not late, "loaded_before": late}
