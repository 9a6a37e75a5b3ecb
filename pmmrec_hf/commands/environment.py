"""The machine a command runs on: how many torch threads to use, and whether the Hub can be reached.

Threads: torch's default (every core, per process) oversubscribes a machine that runs several processes or is
busy with other work; the commands take ``--num-threads N`` and otherwise use the physical cores available to
this process, divided by the processes the launcher started on this node, and no more than the cores the load
average leaves idle (at least 1). The choice is printed.

Hub: a command given a Hub id checks once, before loading anything, that the Hub answers (a single request with a
short timeout), instead of letting every download retry for minutes. When it does not, or ``HF_HUB_OFFLINE`` is
set, repos already in the local cache are used offline (one warning); anything else is one clear error.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBE_TIMEOUT_S = 5.0


class HubUnavailableError(RuntimeError):
    """The Hub cannot be reached (or offline mode is on) and a command needs something that is not cached."""


# --------------------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup (container) CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def physical_cores(cpus: int) -> int:
    """Physical cores among `cpus` logical ones (hyper-threads counted once), from /proc/cpuinfo when readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        siblings = re.search(r"^siblings\s*:\s*(\d+)", text, re.M)
        cores = re.search(r"^cpu cores\s*:\s*(\d+)", text, re.M)
        if siblings and cores and int(siblings.group(1)) > int(cores.group(1)):
            return max(1, cpus * int(cores.group(1)) // int(siblings.group(1)))
    except OSError:
        pass
    return cpus


def choose_num_threads(cores: int, local_processes: int = 1, load_average: float | None = None) -> tuple[int, str]:
    """Threads per process that do not oversubscribe `cores`: cores / processes on this node, capped by the cores
    the 1-minute load average leaves idle; at least 1. Returns the count and the reason, for the log."""
    local_processes = max(1, local_processes)
    share = max(1, cores // local_processes)
    reason = f"{cores} physical core(s) / {local_processes} process(es) on this node"
    if load_average is not None:
        idle = max(1, math.floor(cores - load_average + 0.5))
        if idle < share:
            return idle, f"{reason}, capped by the load average ({load_average:.1f}) to the idle cores"
    return share, reason


def set_torch_threads(num_threads: int | None, print_fn=None) -> int:
    """Apply ``--num-threads`` (or the automatic choice; an explicit ``OMP_NUM_THREADS`` is honoured) and print it."""
    import torch

    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {num_threads}")
        reason = "--num-threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        num_threads, reason = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
        num_threads, reason = choose_num_threads(physical_cores(available_cpus()), local, load)
    torch.set_num_threads(num_threads)
    (print_fn or _print_err)(f"torch threads: {num_threads} ({reason}; set with --num-threads)")
    return num_threads


def _print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# the Hub
# --------------------------------------------------------------------------------------------------------------------


def hub_repo_ids(*sources: str | None) -> list[str]:
    """The arguments that name Hub repos: not None, not 'synthetic', not an existing local path, shaped like an id."""
    ids = []
    for source in sources:
        if not source or source == "synthetic" or os.path.exists(source):
            continue
        if _REPO_ID_RE.match(source) and source not in ids:
            ids.append(source)
    return ids


def _endpoint(endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def probe_hub(endpoint: str | None = None, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub at `endpoint` answers one request within `timeout` seconds, else why not."""
    from huggingface_hub import get_session

    url = _endpoint(endpoint) + "/api/whoami-v2"
    try:  # huggingface_hub's own HTTP client (its proxy settings), one request, no retries
        get_session().get(url, timeout=timeout)  # any HTTP answer (401 included) means the Hub is there
    except Exception as err:  # noqa: BLE001 - the transport's connect / timeout / DNS errors
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def _cached(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "adapter_config.json", "README.md"):
        found = try_to_load_from_cache(repo_id, name, repo_type=repo_type)
        if isinstance(found, str):
            return True
    return False


def _go_offline() -> None:
    """Offline mode for the rest of this process (transformers and huggingface_hub read the same constant)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def ensure_hub_access(repo_ids: list[str], command: str, *, write: bool = False, endpoint: str | None = None,
                      repo_type: str = "model") -> None:
    """Fail fast, with one message, when `repo_ids` need the Hub and it is off or unreachable.

    Reading: repos found in the local cache are used offline (one warning); a repo not cached is a
    :class:`HubUnavailableError`. Writing (`write=True`): offline mode or no answer is an error at once."""
    if not repo_ids and not write:
        return
    if hub_is_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        why = probe_hub(endpoint)
        if why is None:
            return
        why = f"the Hub at {_endpoint(endpoint)} did not answer ({why})"
    if write:
        raise HubUnavailableError(f"{command} needs the Hub, but {why}.")
    missing = [repo for repo in repo_ids if not _cached(repo, repo_type)]
    if missing:
        raise HubUnavailableError(
            f"{command}: {why}, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the local "
            "cache (nor a local folder of that name). Give a local folder instead, or download it once where the "
            "Hub is reachable (`hf download REPO`).")
    _go_offline()
    _print_err(f"warning: {command}: {why}; using the cached {', '.join(repo_ids)} offline.")
