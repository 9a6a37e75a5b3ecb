"""Kill a write at every write boundary: each write runs in a forked child process that the test hook
(``PMMREC_TEST_KILL_AT``, ``pmmrec_hf.atomic_io``) SIGKILLs at the n-th time it reaches a boundary. A first
uninterrupted run counts how often the write reaches each of ``atomic_io.WRITE_BOUNDARIES``, so every kill
point is covered, a new boundary included, without editing the tests."""

from __future__ import annotations

import json
import os
import signal
import traceback
from collections.abc import Callable

from pmmrec_hf import atomic_io

COUNT = "count"  # a hook value naming no boundary: nothing is killed, every boundary is counted


def run_child(write: Callable[[], None], kill_at: str, timeout_s: int = 120) -> dict[str, int] | None:
    """Run `write()` in a forked child with ``PMMREC_TEST_KILL_AT=kill_at``. None when the hook killed it
    (SIGKILL); when it completed, how many times it reached each boundary. Any other end (an exception, a
    hang) fails the test."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            signal.alarm(timeout_s)  # a hang ends the child with SIGALRM, which the parent reports
            os.environ[atomic_io.KILL_ENV] = kill_at
            atomic_io._hits.clear()
            write()
            os.write(write_end, json.dumps(atomic_io._hits).encode())
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"the write ended by signal {os.WTERMSIG(status)} at {kill_at}"
        return None
    assert os.WEXITSTATUS(status) == 0, f"the write failed (exit {os.WEXITSTATUS(status)}) with kill point {kill_at}"
    return json.loads(report)


def kill_at_every_boundary(setup: Callable[[], None], write: Callable[[], None],
                           check: Callable[[str], None]) -> list[str]:
    """For every boundary and every time `write` reaches it: `setup()` the folder, run `write` killed
    there, `check(point)` what is left. Returns the kill points ("<boundary>:<n>")."""
    setup()
    counts = run_child(write, COUNT)
    assert counts is not None and set(counts) <= set(atomic_io.WRITE_BOUNDARIES), counts
    points = [f"{name}:{n}" for name in atomic_io.WRITE_BOUNDARIES for n in range(1, counts.get(name, 0) + 1)]
    for point in points:
        setup()
        assert run_child(write, point) is None, f"the write did not reach {point}"
        check(point)
    return points
