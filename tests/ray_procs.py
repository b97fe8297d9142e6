"""Processes and listening sockets of the Ray instances a test starts (Linux: /proc and `ss`)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import time
from pathlib import Path


def descendants(pid: int | None = None) -> set[int]:
    """Every live process below ``pid`` (default: this one), from /proc's parent links."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    """The ones still running (a zombie has exited)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def wait_gone(pids: set[int], seconds: float = 30.0) -> set[int]:
    """The processes of ``pids`` still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = alive(pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(local address, pid, process name) of every TCP socket these processes listen on (`ss -ltnp`)."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+),', line):
            if int(pid) in pids:
                found.append((fields[3], int(pid), name))
    return found


def is_loopback(local: str) -> bool:
    """``127.0.0.1:5``, ``[::ffff:127.0.0.1]:5`` or ``[::1]:5`` -> True; ``*:5``, ``0.0.0.0:5``, an interface -> False."""
    host = local.rsplit(":", 1)[0].strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
