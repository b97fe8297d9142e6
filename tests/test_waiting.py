"""OpenMP's wait policy while runtimes alternate (runtime/backends/waiting.py): set before any
OpenMP runtime loads, recorded honestly when one was loaded first, and a user's choice kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.backends.waiting import loaded_openmp

ROOT = Path(__file__).resolve().parents[1]

MAPS = """\
7f1c2a000000-7f1c2a020000 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0
7f1c2b000000-7f1c2b020000 r-xp 00000000 08:01 124 /opt/venv/lib/python3.11/site-packages/torch.libs/libgomp-a34b3233.so.1
7f1c2c000000-7f1c2c020000 r-xp 00000000 08:01 125 /usr/lib/libgompish-not-a-library.txt
7f1c2d000000-7f1c2d020000 r-xp 00000000 08:01 126 /opt/intel/lib/libiomp5.so
7f1c2e000000-7f1c2e020000 r-xp 00000000 08:01 127 /usr/lib/libc.so.6
"""


def test_loaded_openmp_reads_the_mapped_libraries():
    assert loaded_openmp(MAPS) == ["libgomp-a34b3233.so.1", "libgomp.so.1.0.0", "libiomp5.so"]
    assert loaded_openmp("") == []


def _child(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def clean_env():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_passive_before_openmp_loads_applies_to_the_runtime_loaded_after(clean_env):
    pytest.importorskip("torch")
    got = _child("import json, os\nfrom runtime.backends.waiting import passive_openmp, loaded_openmp\n"
                 "w = passive_openmp()\nimport torch\n"
                 "print(json.dumps({**w, 'env': os.environ['OMP_WAIT_POLICY'], 'after': loaded_openmp()}))", clean_env)
    assert got["omp_wait_policy"] == got["env"] == "PASSIVE" and got["set_by"] == "detbench"
    assert got["applies"] is True and got["loaded_before"] == []
    assert got["after"], "PyTorch loaded no OpenMP runtime: the check proves nothing here"


def test_openmp_loaded_first_is_recorded_as_not_covered(clean_env):
    pytest.importorskip("torch")
    got = _child("import json, torch\nfrom runtime.backends.waiting import passive_openmp\n"
                 "print(json.dumps(passive_openmp()))", clean_env)
    assert got["applies"] is False and any(n.startswith("libgomp") for n in got["loaded_before"])


def test_a_users_policy_is_kept(clean_env):
    got = _child("import json\nfrom runtime.backends.waiting import passive_openmp\n"
                 "print(json.dumps(passive_openmp()))", {**clean_env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert got["omp_wait_policy"] == "ACTIVE" and got["set_by"] == "user"
