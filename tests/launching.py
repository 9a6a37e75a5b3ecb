"""Running launched multi-process jobs from tests: a free port, and a run that cannot hang the suite.

A launched job that hangs (a collective one process never reaches) must fail its test with what every process
was doing, not sit until the suite's limit. `run_launched` runs the job with Python's fault handler on; at the
timeout it sends SIGABRT to the launcher and every process it started (each Python process prints every
thread's stack), then kills them all and fails with the output tails. The processes are found through the
process tree, not a process group: torch's launcher starts each worker in a session of its own.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import psutil
import pytest


def free_port() -> int:
    """A TCP port free at the time of asking (for ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(command: list[str], *, env: dict[str, str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` (a launcher and its processes) to the end; fail the test with every process's stack when it
    takes longer than `timeout` seconds. Returns the completed process (the caller checks its return code)."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _process_tree(process.pid)  # before any dies: orphans are re-parented and cannot be found after
        _signal_all(tree, signal.SIGABRT)  # the fault handler prints each process's threads
        time.sleep(5)
        _signal_all(tree + _process_tree(process.pid), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"`{' '.join(command[:6])} ...` did not end within {timeout:.0f} s (stacks below).\n"
                    f"--- stdout (tail) ---\n{stdout[-4000:]}\n--- stderr (tail) ---\n{stderr[-20000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
