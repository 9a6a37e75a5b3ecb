"""A small, local, Hugging Face Hub-compatible HTTP server for offline tests.

The real Hugging Face Hub is not reachable from the test machines, so this module implements, with the standard
library only (``http.server``), the part of the Hub HTTP API that the real ``huggingface_hub`` client and
``transformers``' ``from_pretrained`` use:

* accounts: ``GET /api/whoami-v2``;
* repositories: ``POST /api/repos/create``, ``DELETE /api/repos/delete``,
  ``PUT /api/{type}s/{repo_id}/settings`` (visibility), ``GET /api/{type}s/{repo_id}[/revision/{rev}]``
  (``repo_info``/``model_info``/``dataset_info``: ``sha``, ``siblings``, ``private``...);
* uploads: ``POST /api/{type}s/{repo_id}/preupload/{rev}`` (always answers ``uploadMode: "regular"``, so the client
  sends the file content base64-encoded inside the commit payload and never tries Git LFS or Xet) and
  ``POST /api/{type}s/{repo_id}/commit/{rev}`` (ndjson payload), ``POST /api/validate-yaml`` (README checks);
* refs and history: ``GET /api/{type}s/{repo_id}/refs``, ``POST|DELETE /api/{type}s/{repo_id}/branch/{branch}``,
  ``POST|DELETE /api/{type}s/{repo_id}/tag/{tag}``, ``GET /api/{type}s/{repo_id}/commits/{rev}``;
* listing: ``GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]``, ``POST /api/{type}s/{repo_id}/paths-info/{rev}``;
* downloads: ``HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}`` with the ``X-Repo-Commit``, ``ETag``,
  ``Content-Length`` and ``Location`` headers the client relies on, and HTTP ``Range`` support.

Errors use the ``X-Error-Code`` / ``X-Error-Message`` headers of the real Hub so that the client raises
``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError`` (an ``EntryNotFoundError``) or a
plain ``HfHubHTTPError`` (e.g. status 401 for an invalid token).

Storage layout (under the ``root`` folder given to :class:`LocalHubServer`)::

    {type}s/{namespace}/{name}/repo.json          # id, type, private, createdAt
    {type}s/{namespace}/{name}/refs.json          # {"branches": {name: sha}, "tags": {name: sha}}
    {type}s/{namespace}/{name}/commits/{sha}.json # parents, title, message, author, date and the full file
                                                  # snapshot {path: {"oid": git-sha1, "size": n}}
    {type}s/{namespace}/{name}/objects/{oid[:2]}/{oid}  # file contents, content-addressed by git blob sha1

Use in a test::

    from hub_server import LocalHubServer, use_local_hub

    with LocalHubServer(tmp_path / "hub", tokens={"hf_alice": "alice"}) as server, use_local_hub(server):
        api = HfApi(endpoint=server.endpoint, token="hf_alice")
        ...

or with the pytest fixtures ``local_hub_server`` (a started server, environment untouched) and ``local_hub`` (a
started server with the process environment pointed at it; the token of user ``alice`` is
``LocalHubServer.DEFAULT_TOKENS`` key ``"hf_local_alice"``).

A *subprocess* only needs environment variables; :func:`hub_env` returns them. They are:
``HF_ENDPOINT`` (the server), ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` / ``HF_ASSETS_CACHE`` /
``HF_XET_CACHE`` / ``HF_TOKEN_PATH`` / ``HF_MODULES_CACHE`` (a fresh cache, no stored token),
``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` (the token, or empty for anonymous access), ``HF_HUB_DISABLE_XET=1``,
``HF_HUB_OFFLINE=0``, ``TRANSFORMERS_OFFLINE=0``,
``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``, ``HUGGINGFACE_CO_STAGING=`` (off),
``HF_OIDC_RESOURCE=`` (off) and ``NO_PROXY`` / ``no_proxy`` (loopback added, so a configured proxy is bypassed)::

    env = {**os.environ, **hub_env(server, token="hf_alice")}
    subprocess.run([sys.executable, "-c", "..."], env=env, check=True, timeout=60)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "DEFAULT_TOKENS",
    "HubError",
    "LocalHubServer",
    "hub_env",
    "local_hub",
    "local_hub_server",
    "use_local_hub",
]

#: Tokens of the pytest fixtures: token -> user name.
DEFAULT_TOKENS: dict[str, str] = {"hf_local_alice": "alice", "hf_local_bob": "bob"}

_REPO_TYPES = ("model", "dataset", "space", "kernel")
_URL_PREFIX = {"dataset": "datasets/", "space": "spaces/", "kernel": "kernels/", "model": ""}
_PLURAL_TO_TYPE = {f"{t}s": t for t in _REPO_TYPES}
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}$")
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    b"*.msgpack filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    b"*.arrow filter=lfs diff=lfs merge=lfs -text\n"
)
_PAGE_SIZE = 1000
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error answered to the client: HTTP status, JSON ``{"error": message}`` and Hub error headers."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})


def _repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _git_blob_sha1(content: bytes) -> str:
    h = hashlib.sha1(f"blob {len(content)}\0".encode())
    h.update(content)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# card metadata: the checks the Hub applies to a README's YAML block (``POST /api/validate-yaml`` and every commit
# that writes README.md), for the fields pmmrec_hf writes. Licence identifiers: https://huggingface.co/docs/hub/
# repositories-licenses; fields: the model card spec (https://huggingface.co/docs/hub/model-cards) as
# ``huggingface_hub.ModelCardData`` / ``DatasetCardData`` read them.
# --------------------------------------------------------------------------------------------------------------------

HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 grok2-community gemma unknown
other
""".split())
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,94}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
_STRING_LIST_FIELDS = ("tags", "datasets", "metrics", "language")


def _string_or_list(value: Any) -> list | None:
    """The Hub accepts a string or a list of strings for its list fields; None for anything else."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def card_metadata_problems(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """(errors, warnings) of a card's YAML metadata block, checked the way the Hub checks the fields we write."""
    import yaml

    errors: list[str] = []
    warnings: list[str] = []
    match = re.match(r"^\s*---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|$)", content, re.S)
    if match is None:
        return errors, ["empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(1) or "") or {}
    except yaml.YAMLError as err:
        return [f"Invalid YAML in the metadata block: {err}"], warnings
    if not isinstance(data, dict):
        return [f"The metadata block must be a YAML mapping, not {type(data).__name__}"], warnings
    if "license" in data:
        license_ = data["license"]
        if not isinstance(license_, str) or license_ not in HUB_LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license identifiers '
                          f"(https://huggingface.co/docs/hub/repositories-licenses), got {license_!r}")
        elif license_ == "other" and not data.get("license_name"):
            warnings.append('"license: other" should come with "license_name" (and a LICENSE file)')
    for name in _STRING_LIST_FIELDS:
        if name in data and _string_or_list(data[name]) is None:
            errors.append(f'"{name}" must be a string or a list of strings, got {data[name]!r}')
    for lang in _string_or_list(data.get("language")) or []:
        if not _LANGUAGE_RE.match(lang):
            errors.append(f'"language" must hold ISO 639 language codes (e.g. "en"), got {lang!r}')
    for name in ("datasets", "base_model") if repo_type == "model" else ("base_model",):
        if name not in data or (name == "datasets" and _string_or_list(data[name]) is None):
            continue
        ids = _string_or_list(data[name])
        if ids is None:
            errors.append(f'"{name}" must be a repo id or a list of repo ids, got {data[name]!r}')
            continue
        for repo in ids:
            if not _REPO_ID_RE.match(repo) or "--" in repo or ".." in repo:
                errors.append(f'"{name}" with value {repo!r} is not a valid repo id (namespace/name)')
    for name in ("library_name", "pipeline_tag", "pretty_name", "license_name", "license_link", "model_name"):
        if name in data and not isinstance(data[name], str):
            errors.append(f'"{name}" must be a string, got {data[name]!r}')
    if repo_type == "model" and "model-index" in data:
        errors += _model_index_problems(data["model-index"])
    return errors, warnings


def _model_index_problems(index: Any) -> list[str]:
    """The model-index structure the Hub requires: [{name, results: [{task: {type}, dataset: {type, name},
    metrics: [{type, value}]}]}] (what ``huggingface_hub.model_index_to_eval_results`` reads)."""
    if not isinstance(index, list) or not index:
        return ['"model-index" must be a non-empty list']
    problems = []
    for i, model in enumerate(index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            problems.append(f'"model-index[{i}].name" must be a string')
            continue
        results = model.get("results")
        if not isinstance(results, list):
            problems.append(f'"model-index[{i}].results" must be a list')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict):
                problems.append(f'"{where}" must be a mapping')
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                problems.append(f'"{where}.task.type" must be a string')
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                problems.append(f'"{where}.dataset" needs string "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                problems.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    problems.append(f'"{where}.metrics[{k}]" needs a string "type" and a "value"')
    return problems


def _validate_file_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise HubError(400, "Invalid file path: empty or not a string")
    path = path.lstrip("/").removeprefix("./")
    parts = path.split("/")
    if (
        not path
        or len(path) > 1000
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] == ".git"
        or "\0" in path
        or "\\" in path
    ):
        raise HubError(400, f"Invalid file path: {path!r}")
    return path


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------------


class _Store:
    """On-disk repositories. All metadata reads/writes happen under one lock (tests are small)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self._commit_cache: dict[tuple[str, str], dict] = {}

    # -- repos ---------------------------------------------------------------------------------------------------

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.root / f"{repo_type}s" / ns / name

    def load_meta(self, repo_type: str, repo_id: str) -> dict | None:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def save_meta(self, repo_type: str, repo_id: str, meta: dict) -> None:
        _atomic_write_json(self.repo_dir(repo_type, repo_id) / "repo.json", meta)

    def load_refs(self, rdir: Path) -> dict:
        return json.loads((rdir / "refs.json").read_text())

    def save_refs(self, rdir: Path, refs: dict) -> None:
        _atomic_write_json(rdir / "refs.json", refs)

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> dict:
        rdir = self.repo_dir(repo_type, repo_id)
        rdir.mkdir(parents=True, exist_ok=True)
        meta = {"id": repo_id, "type": repo_type, "private": bool(private), "createdAt": _now_iso()}
        self.save_refs(rdir, {"branches": {}, "tags": {}})
        # Like the real Hub: a new repo starts with one commit holding a `.gitattributes` file.
        oid = self.write_blob(rdir, _GITATTRIBUTES)
        tree = {".gitattributes": {"oid": oid, "size": len(_GITATTRIBUTES)}}
        sha = self._write_commit(rdir, [], tree, "initial commit", "", author)
        self.save_refs(rdir, {"branches": {"main": sha}, "tags": {}})
        self.save_meta(repo_type, repo_id, meta)  # written last: a repo exists once repo.json exists
        return meta

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        rdir = self.repo_dir(repo_type, repo_id)
        trash = rdir.with_name(f".deleted-{rdir.name}-{uuid.uuid4().hex}")
        os.replace(rdir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._commit_cache = {k: v for k, v in self._commit_cache.items() if not k[0].startswith(str(rdir))}

    # -- blobs and commits ---------------------------------------------------------------------------------------

    def blob_path(self, rdir: Path, oid: str) -> Path:
        return rdir / "objects" / oid[:2] / oid

    def write_blob(self, rdir: Path, content: bytes) -> str:
        oid = _git_blob_sha1(content)
        path = self.blob_path(rdir, oid)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{oid}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return oid

    def _write_commit(self, rdir: Path, parents: list[str], tree: dict, title: str, message: str, author: str) -> str:
        date = _now_iso()
        payload = json.dumps(
            {
                "parents": parents,
                "tree": tree,
                "title": title,
                "message": message,
                "author": author,
                "date": date,
                "nonce": uuid.uuid4().hex,
            },
            sort_keys=True,
        ).encode()
        sha = hashlib.sha1(payload).hexdigest()
        commit = {
            "id": sha,
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "date": date,
            "tree": tree,
        }
        _atomic_write_json(rdir / "commits" / f"{sha}.json", commit)
        return sha

    def get_commit(self, rdir: Path, sha: str) -> dict:
        key = (str(rdir), sha)
        commit = self._commit_cache.get(key)
        if commit is None:
            commit = json.loads((rdir / "commits" / f"{sha}.json").read_text())
            self._commit_cache[key] = commit
        return commit

    def resolve_revision(self, rdir: Path, revision: str) -> str:
        """Branch, tag, full or (unique, 7+ chars) abbreviated commit sha -> full commit sha."""
        refs = self.load_refs(rdir)
        for kind, prefix in (("branches", "refs/heads/"), ("tags", "refs/tags/")):
            name = revision.removeprefix(prefix)
            if name in refs[kind]:
                return refs[kind][name]
        if _SHA_RE.match(revision):
            if (rdir / "commits" / f"{revision}.json").is_file():
                return revision
            matches = [p.stem for p in (rdir / "commits").glob(f"{revision}*.json")]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, rdir: Path, sha: str) -> list[dict]:
        """First-parent history, newest first (bounded by the number of stored commits)."""
        out: list[dict] = []
        seen: set[str] = set()
        current: str | None = sha
        while current is not None and current not in seen:
            seen.add(current)
            commit = self.get_commit(rdir, current)
            out.append(commit)
            current = commit["parents"][0] if commit["parents"] else None
        return out

    def commit_operations(
        self,
        rdir: Path,
        branch: str,
        operations: list[tuple[str, dict]],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None,
        repo_type: str = "model",
    ) -> str:
        refs = self.load_refs(rdir)
        branch = branch.removeprefix("refs/heads/")
        if branch not in refs["branches"]:
            if _SHA_RE.match(branch) or branch in refs["tags"]:
                raise HubError(400, f"Cannot commit to '{branch}': commits can only be pushed to a branch")
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = refs["branches"][branch]
        if parent_commit is not None and not head.startswith(parent_commit):
            raise HubError(412, f"A commit has happened since. Please refresh and try again. (head is {head})")
        tree = dict(self.get_commit(rdir, head)["tree"])
        for key, value in operations:
            if key == "file":
                path = _validate_file_path(value.get("path"))
                encoding = value.get("encoding", "base64")
                content = value.get("content", "")
                if encoding == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (ValueError, TypeError) as err:
                        raise HubError(400, f"Invalid base64 content for '{path}'") from err
                elif encoding in ("utf-8", "utf8", None):
                    data = str(content).encode()
                else:
                    raise HubError(400, f"Unsupported encoding '{encoding}' for '{path}'")
                if path == "README.md":  # the Hub refuses a commit whose card metadata is invalid
                    errors, _ = card_metadata_problems(data.decode("utf-8", "replace"), repo_type)
                    if errors:
                        raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
                tree[path] = {"oid": self.write_blob(rdir, data), "size": len(data)}
            elif key == "lfsFile":
                raise HubError(
                    400,
                    f"LFS file '{value.get('path')}': this local hub only accepts regular uploads "
                    "(preupload answers uploadMode='regular'); LFS/Xet storage is not available.",
                )
            elif key == "deletedFile":
                path = _validate_file_path(value.get("path"))
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                folder = _validate_file_path(str(value.get("path", "")).rstrip("/"))
                doomed = [p for p in tree if p.startswith(folder + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")
        # A path cannot be both a file and a folder.
        paths = set(tree)
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise HubError(400, f"'{'/'.join(parts[:i])}' is a file and cannot be a folder of '{p}'")
        sha = self._write_commit(rdir, [head], tree, title, message, author)
        refs["branches"][branch] = sha
        self.save_refs(rdir, refs)
        return sha


# --------------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------------


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, hub: LocalHubServer):
        # A proxy, so that the running server does not keep its `LocalHubServer` alive (see its finalizer).
        self.hub = weakref.proxy(hub)
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # seconds without data before an idle keep-alive connection is dropped
    server: _HubHTTPServer

    # -- plumbing ------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        return  # silence the default stderr access log; see `LocalHubServer.requests`

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        limit = self.server.hub.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:  # bounded: each chunk is counted against `limit`
                line = self.rfile.readline(1024)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError as err:
                    self.close_connection = True
                    raise HubError(400, "Malformed chunked body") from err
                if size == 0:
                    for _ in range(100):  # trailers
                        if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, f"Request body larger than {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(chunks)
        raw_length = (self.headers.get("Content-Length") or "0").strip()
        if not raw_length.isdigit():  # "abc", "-1", "1e3", "1, 2": the Hub's front end answers 400
            self.close_connection = True  # the body's extent is unknown: the connection cannot stay in sync
            raise HubError(400, f"Malformed Content-Length header: {raw_length!r}")
        length = int(raw_length)
        if length > limit:
            self.close_connection = True
            raise HubError(413, f"Request body larger than {limit} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        self._method = method
        status = 500
        try:
            body = self._read_body()  # always consumed, so that a keep-alive connection stays in sync
            split = urlsplit(self.path)
            self._query = parse_qs(split.query, keep_blank_values=True)
            segments = split.path.split("/")[1:]
            if segments and segments[-1] == "" and len(segments) > 1:
                segments = segments[:-1]
            self._body = body
            self._user = self._authenticate()
            status = self._route(method, segments)
        except HubError as err:
            status = err.status
            self._send_error(err)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            status = 499
        except Exception as err:  # noqa: BLE001 - a bug in this server: report it to the client and the test
            status = 500
            self.close_connection = True
            self.server.hub.errors.append(traceback.format_exc())
            with contextlib.suppress(Exception):
                self._send_error(HubError(500, f"Local hub internal error: {type(err).__name__}: {err}"))
        finally:
            self.server.hub.requests.append((method, self.path, status))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)
        return status

    def _send_json(self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> int:
        return self._send(status, json.dumps(data).encode(), headers=headers)

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        # Header values must be latin-1 and single-line.
        headers["X-Error-Message"] = err.message.encode("latin-1", "replace").decode("latin-1").replace("\n", " ")
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    # -- auth ----------------------------------------------------------------------------------------------------

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.server.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self) -> str:
        if self._user is None:
            raise HubError(401, "You must be authenticated to perform this action (missing Authorization header)")
        return self._user

    def _can_write_namespace(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.server.hub.orgs.get(namespace, ()))

    def _load_repo(self, repo_type: str, repo_id: str, write: bool = False) -> tuple[dict, Path]:
        """Load a repo and check access, answering like the Hub (private repos are 'not found' to others)."""
        hub = self.server.hub
        meta = hub.store.load_meta(repo_type, repo_id)
        namespace = repo_id.split("/")[0]
        is_member = self._can_write_namespace(self._user, namespace)
        if meta is None:
            raise _repo_not_found(404)
        if meta["private"] and not is_member:
            # Like the Hub: 401 when anonymous, 404 for another user; both carry X-Error-Code: RepoNotFound.
            raise _repo_not_found(401 if self._user is None else 404)
        if write:
            self._require_user()
            if not is_member:
                raise HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        return meta, hub.store.repo_dir(repo_type, repo_id)

    # -- routing -------------------------------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]) -> int:
        seg = [unquote(s) for s in seg] if seg and seg[0] != "api" else seg
        if seg and seg[0] == "api":
            return self._route_api(method, seg[1:])
        # /[{type}s/]{namespace}/{name}/resolve/{revision}/{path...}
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces", "kernels", "models") and len(seg) > 3 and seg[3] == "resolve":
            repo_type = _PLURAL_TO_TYPE[seg[0]]
            seg = seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = self._repo_id(seg[0], seg[1])
            return self._resolve(repo_type, repo_id, seg[3], "/".join(seg[4:]))
        if len(seg) >= 2 and seg[-1] == "batch" and any(s.endswith(".git") for s in seg):
            raise HubError(
                400, "This local hub does not implement Git LFS: files are uploaded inline (uploadMode='regular')."
            )
        raise HubError(404, f"Local hub: no route for {method} {self.path}")

    @staticmethod
    def _repo_id(namespace: str, name: str) -> str:
        if not _NAME_RE.match(namespace) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise _repo_not_found()
        return f"{namespace}/{name}"

    def _route_api(self, method: str, raw: list[str]) -> int:
        seg = [unquote(s) for s in raw]
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(seg) >= 3 and seg[0] in _PLURAL_TO_TYPE:
            repo_type = _PLURAL_TO_TYPE[seg[0]]
            repo_id = self._repo_id(seg[1], seg[2])
            sub, sub_raw = seg[3:], raw[3:]
            return self._route_repo(method, repo_type, repo_id, sub, sub_raw)
        raise HubError(404, f"Local hub: no route for {method} {self.path}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, sub: list[str], sub_raw: list[str]) -> int:
        action = sub[0] if sub else ""
        if method == "GET" and not sub:
            return self._repo_info(repo_type, repo_id, None)
        if method == "GET" and action == "revision" and len(sub) >= 2:
            return self._repo_info(repo_type, repo_id, "/".join(sub[1:]))
        if method == "GET" and action == "tree" and len(sub) >= 2:
            # revision is quoted with safe="" (one segment), the path may be one quoted segment or several.
            return self._tree(repo_type, repo_id, sub[1], "/".join(sub[2:]))
        if method == "GET" and action == "commits" and len(sub) >= 2:
            return self._commits(repo_type, repo_id, "/".join(sub[1:]))
        if method == "GET" and action == "refs" and len(sub) == 1:
            return self._refs(repo_type, repo_id)
        if method == "POST" and action == "preupload" and len(sub) >= 2:
            return self._preupload(repo_type, repo_id, "/".join(sub[1:]))
        if method == "POST" and action == "commit" and len(sub) >= 2:
            return self._commit(repo_type, repo_id, "/".join(sub[1:]))
        if method == "POST" and action == "paths-info" and len(sub) >= 2:
            return self._paths_info(repo_type, repo_id, "/".join(sub[1:]))
        if action == "branch" and len(sub) >= 2 and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, "/".join(sub[1:]))
        if action == "tag" and len(sub) >= 2 and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, "/".join(sub[1:]))
        if action == "settings" and method == "PUT" and len(sub) == 1:
            return self._settings(repo_type, repo_id)
        if action == "resolve" and len(sub) >= 3 and method in ("GET", "HEAD"):
            return self._resolve(repo_type, repo_id, sub[1], "/".join(sub[2:]))
        if action.startswith("xet-"):
            raise HubError(404, "This local hub does not implement Xet storage (set HF_HUB_DISABLE_XET=1).")
        raise HubError(404, f"Local hub: no route for {method} {self.path}")

    # -- helpers -------------------------------------------------------------------------------------------------

    def _json_body(self) -> Any:
        if not self._body:
            return {}
        try:
            return json.loads(self._body)
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _next_link(self, cursor: int) -> dict[str, str]:
        query = {k: v for k, v in self._query.items() if k != "cursor"}
        parts = [f"{quote(k)}={quote(v)}" for k, vs in query.items() for v in vs] + [f"cursor={cursor}"]
        path = urlsplit(self.path).path
        return {"Link": f'<{self.server.hub.endpoint}{path}?{"&".join(parts)}>; rel="next"'}

    def _cursor(self) -> int:
        try:
            return max(0, int(self._query.get("cursor", ["0"])[0]))
        except ValueError as err:
            raise HubError(400, "Invalid cursor") from err

    def _flag(self, name: str) -> bool:
        return self._query.get(name, ["false"])[0].lower() in ("1", "true", "yes")

    # -- endpoints -----------------------------------------------------------------------------------------------

    def _whoami(self) -> int:
        user = self._require_user()
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": "write"}
            for org, members in sorted(self.server.hub.orgs.items())
            if user in members
        ]
        return self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@localhost",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": "local-hub",
                        "role": "write",
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            }
        )

    def _validate_yaml(self) -> int:
        """Like the Hub: 400 with the errors (text/plain when asked for it), else 200 {"errors": [], "warnings"}."""
        try:
            body = json.loads(self._body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise HubError(400, 'validate-yaml needs a JSON body {"repoType": ..., "content": "<card text>"}')
        repo_type = body.get("repoType") or "model"
        if repo_type not in _PLURAL_TO_TYPE.values():
            raise HubError(400, f"Invalid repoType: {repo_type!r}")
        errors, warnings = card_metadata_problems(body["content"], repo_type)
        if errors:
            text = "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors)
            if "text/plain" in (self.headers.get("Accept") or ""):  # RepoCard.validate asks for text
                return self._send(400, text.encode(), content_type="text/plain; charset=utf-8")
            # HfApi (before committing a README.md) reads {"errors": [{"message"}], "warnings": [...]}
            header = text.encode("latin-1", "replace").decode("latin-1").replace("\n", " ")
            return self._send_json({"error": text, "errors": [{"message": e} for e in errors],
                                    "warnings": [{"message": w} for w in warnings]}, status=400,
                                   headers={"X-Error-Message": header})
        return self._send_json({"errors": [], "warnings": [{"message": w} for w in warnings]})

    def _create_repo(self) -> int:
        user = self._require_user()
        payload = self._json_body()
        name = payload.get("name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not _NAME_RE.match(str(namespace)):
            raise HubError(400, f"Invalid namespace: {namespace!r}")
        if not self._can_write_namespace(user, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace '{namespace}'")
        private = payload.get("private")
        if "visibility" in payload:
            private = payload["visibility"] == "private"
        repo_id = f"{namespace}/{name}"
        url = self._repo_url(repo_type, repo_id)
        store = self.server.hub.store
        with store.lock:
            if store.load_meta(repo_type, repo_id) is not None:
                return self._send_json(
                    {"error": f"You already created this {repo_type} repo", "url": url},
                    status=409,
                    headers={"X-Error-Message": "You already created this repo"},
                )
            store.create_repo(repo_type, repo_id, bool(private), user)
        return self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> int:
        self._require_user()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        namespace = payload.get("organization") or self._user
        repo_id = self._repo_id(str(namespace), str(payload.get("name")))
        store = self.server.hub.store
        with store.lock:
            self._load_repo(repo_type, repo_id, write=True)
            store.delete_repo(repo_type, repo_id)
        return self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> int:
        payload = self._json_body()
        store = self.server.hub.store
        with store.lock:
            meta, _ = self._load_repo(repo_type, repo_id, write=True)
            if "private" in payload and payload["private"] is not None:
                meta["private"] = bool(payload["private"])
            if payload.get("visibility") in ("private", "public"):
                meta["private"] = payload["visibility"] == "private"
            store.save_meta(repo_type, repo_id, meta)
        return self._send_json({"private": meta["private"]})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> int:
        store = self.server.hub.store
        with store.lock:
            meta, rdir = self._load_repo(repo_type, repo_id)
            sha = store.resolve_revision(rdir, revision or "main")
            commit = store.get_commit(rdir, sha)
        with_blobs = self._flag("blobs")
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["tree"].values()),
        }
        if repo_type == "model":
            config = self._small_json(rdir, commit["tree"].get("config.json"))
            if isinstance(config, dict):
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
                if "model_type" in config:
                    info["library_name"] = "transformers"
        if repo_type == "space":
            info.update(sdk="static", runtime={"stage": "NO_APP_FILE", "hardware": {"current": None}})
        return self._send_json(info)

    def _small_json(self, rdir: Path, entry: dict | None) -> Any:
        if entry is None or entry["size"] > 1_000_000:
            return None
        try:
            return json.loads(self.server.hub.store.blob_path(rdir, entry["oid"]).read_bytes())
        except ValueError:
            return None

    @staticmethod
    def _dir_oid(tree: dict, folder: str) -> str:
        prefix = folder + "/"
        items = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(items).encode()).hexdigest()

    def _entries(self, tree: dict, folder: str, recursive: bool) -> list[dict]:
        """Tree listing of `folder` ('' = root): folders first then files, like the Hub."""
        prefix = folder + "/" if folder else ""
        files, dirs = [], set()
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parts = rest.split("/")
            if recursive:
                for i in range(1, len(parts)):
                    dirs.add(prefix + "/".join(parts[:i]))
                files.append(path)
            elif len(parts) == 1:
                files.append(path)
            else:
                dirs.add(prefix + parts[0])
        out = [{"type": "directory", "oid": self._dir_oid(tree, d), "size": 0, "path": d} for d in sorted(dirs)]
        out += [{"type": "file", "oid": tree[p]["oid"], "size": tree[p]["size"], "path": p} for p in files]
        return out

    def _last_commit(self, rdir: Path, history: list[dict], path: str, is_dir: bool) -> dict | None:
        def state(commit: dict) -> Any:
            tree = commit["tree"]
            return self._dir_oid(tree, path) if is_dir else tree.get(path, {}).get("oid")

        current = state(history[0])
        last = history[0]
        for commit in history[1:]:
            if state(commit) != current:
                break
            last = commit
        return {"id": last["id"], "title": last["title"], "date": last["date"]}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        store = self.server.hub.store
        path = path.strip("/")
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id)
            sha = store.resolve_revision(rdir, revision)
            commit = store.get_commit(rdir, sha)
            history = store.history(rdir, sha) if self._flag("expand") else None
        tree = commit["tree"]
        if path and path in tree:
            raise HubError(400, f"'{path}' is a file, not a folder")
        if path and not any(p.startswith(path + "/") for p in tree):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        entries = self._entries(tree, path, self._flag("recursive"))
        if history is not None:
            for entry in entries:
                entry["lastCommit"] = self._last_commit(rdir, history, entry["path"], entry["type"] == "directory")
        cursor = self._cursor()
        page = entries[cursor : cursor + _PAGE_SIZE]
        headers = self._next_link(cursor + _PAGE_SIZE) if cursor + _PAGE_SIZE < len(entries) else {}
        return self._send_json(page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> int:
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = self._json_body()
            paths = payload.get("paths", [])
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(self._body.decode("utf-8", "replace"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id)
            sha = store.resolve_revision(rdir, revision)
            commit = store.get_commit(rdir, sha)
            history = store.history(rdir, sha) if expand else None
        tree = commit["tree"]
        out = []
        for raw_path in paths[:10_000]:
            path = str(raw_path).strip("/")
            if path in tree:
                entry = {"type": "file", "oid": tree[path]["oid"], "size": tree[path]["size"], "path": path}
            elif path and any(p.startswith(path + "/") for p in tree):
                entry = {"type": "directory", "oid": self._dir_oid(tree, path), "size": 0, "path": path}
            else:
                continue
            if history is not None:
                entry["lastCommit"] = self._last_commit(rdir, history, path, entry["type"] == "directory")
            out.append(entry)
        return self._send_json(out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> int:
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id)
            sha = store.resolve_revision(rdir, revision)
            history = store.history(rdir, sha)
        items = []
        for c in history:
            item = {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "authors": [{"user": c["author"], "avatar": None}],
                "date": c["date"],
                "parents": c["parents"],
            }
            if self._query.get("expand[]") == ["formatted"] or "formatted" in self._query.get("expand[]", []):
                item["formatted"] = {"title": c["title"], "message": c["message"]}
            items.append(item)
        cursor = self._cursor()
        page = items[cursor : cursor + _PAGE_SIZE]
        headers = self._next_link(cursor + _PAGE_SIZE) if cursor + _PAGE_SIZE < len(items) else {}
        return self._send_json(page, headers=headers)

    def _refs(self, repo_type: str, repo_id: str) -> int:
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id)
            refs = store.load_refs(rdir)
        data: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(refs["branches"].items())
            ],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(refs["tags"].items())],
            "converts": [],
        }
        if self._flag("include_prs"):
            data["pullRequests"] = []
        return self._send_json(data)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> int:
        store = self.server.hub.store
        if not _BRANCH_RE.match(branch) or ".." in branch or branch.endswith((".lock", "/")):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id, write=True)
            refs = store.load_refs(rdir)
            if method == "DELETE":
                if branch not in refs["branches"]:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch 'main'")
                del refs["branches"][branch]
                store.save_refs(rdir, refs)
                return self._send_json({})
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            payload = self._json_body()
            starting_point = payload.get("startingPoint") or "main"
            refs["branches"][branch] = store.resolve_revision(rdir, starting_point)
            store.save_refs(rdir, refs)
        return self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, revision_or_tag: str) -> int:
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id, write=True)
            refs = store.load_refs(rdir)
            if method == "DELETE":
                if revision_or_tag not in refs["tags"]:
                    raise HubError(404, f"Invalid rev id: {revision_or_tag}", "RevisionNotFound")
                del refs["tags"][revision_or_tag]
                store.save_refs(rdir, refs)
                return self._send_json({})
            tag = str(self._json_body().get("tag", ""))
            if not _BRANCH_RE.match(tag) or ".." in tag:
                raise HubError(400, f"Invalid tag name: {tag!r}")
            if tag in refs["tags"]:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            refs["tags"][tag] = store.resolve_revision(rdir, revision_or_tag)
            store.save_refs(rdir, refs)
        return self._send_json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> int:
        if self._flag("create_pr"):
            raise HubError(400, "This local hub does not support pull requests (create_pr=True)")
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "Invalid preupload payload: 'files' must be a list")
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id, write=True)
            sha = store.resolve_revision(rdir, revision)
            tree = store.get_commit(rdir, sha)["tree"]
        out = []
        for item in files[:100_000]:
            path = _validate_file_path(item.get("path") if isinstance(item, dict) else None)
            # Always "regular": the content travels base64-encoded inside the commit payload, so the client never
            # needs an LFS batch endpoint, an object storage host or Xet.
            out.append(
                {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(path, {}).get("oid")}
            )
        return self._send_json({"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> int:
        user = self._require_user()
        if self._flag("create_pr"):
            raise HubError(400, "This local hub does not support pull requests (create_pr=True)")
        try:
            items = [json.loads(line) for line in self._body.decode("utf-8").splitlines() if line.strip()]
        except ValueError as err:  # includes UnicodeDecodeError
            raise HubError(400, f"Invalid commit payload (expected ndjson): {err}") from err
        header: dict = {}
        operations: list[tuple[str, dict]] = []
        if len(items) == 1 and isinstance(items[0], dict) and "key" not in items[0]:
            # Legacy single-JSON format: {"summary", "description", "files", "lfsFiles", "deletedFiles"}.
            legacy = items[0]
            header = {k: legacy.get(k) for k in ("summary", "description", "parentCommit")}
            for key, field in (("file", "files"), ("lfsFile", "lfsFiles"), ("deletedFile", "deletedFiles")):
                operations += [(key, op) for op in legacy.get(field) or [] if isinstance(op, dict)]
        else:
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                    raise HubError(400, "Invalid commit payload item (expected {'key': ..., 'value': {...}})")
                if item.get("key") == "header":
                    header = item["value"]
                else:
                    operations.append((str(item.get("key")), item["value"]))
        title = str(header.get("summary") or "").strip()
        if not title:
            raise HubError(400, "Commit message (summary) cannot be empty")
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id, write=True)
            sha = store.commit_operations(
                rdir,
                revision,
                operations,
                title,
                str(header.get("description") or ""),
                user,
                header.get("parentCommit"),
                repo_type=repo_type,
            )
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{sha}"
        return self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": url,
                "commitMessage": title,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        store = self.server.hub.store
        with store.lock:
            _, rdir = self._load_repo(repo_type, repo_id)
            sha = store.resolve_revision(rdir, revision)
            entry = store.get_commit(rdir, sha)["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        blob = store.blob_path(rdir, entry["oid"])
        size = entry["size"]
        pinned = f"{self._repo_url(repo_type, repo_id)}/resolve/{sha}/{quote(path)}"
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            # Sha-pinned URL: the client downloads exactly the commit it resolved with HEAD (same host => keeps auth).
            "Location": pinned,
            "Cache-Control": "private, max-age=0, must-revalidate",
        }
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if not match or (match.group(1) == "" and match.group(2) == ""):
                raise HubError(
                    416, f"Unsupported Range header: {range_header}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1) == "":  # suffix range: last N bytes
                start, end = max(0, size - int(match.group(2))), size - 1
            else:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self._method == "GET" and length:
            with open(blob, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining > 0:  # bounded by the file size
                    chunk = f.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        return status


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


class LocalHubServer:
    """A Hub-compatible HTTP server on ``127.0.0.1:<free port>``, storing repos under ``root``.

    Args:
        root: folder holding the repositories (created if missing; may already hold repos from a previous run).
        tokens: valid access tokens, mapped to the user name they authenticate.
        orgs: optional organisations, mapped to their member user names (members may write in the org namespace).
        max_body_bytes: largest accepted request body (commit payloads carry base64 file contents).

    ``start()`` / ``stop()`` or a ``with`` block run it in a background (daemon) thread; ``endpoint`` is its URL.
    ``requests`` records ``(method, path, status)`` of the last requests and ``errors`` any internal traceback.
    """

    DEFAULT_TOKENS = DEFAULT_TOKENS

    def __init__(
        self,
        root: str | os.PathLike[str],
        tokens: Mapping[str, str],
        *,
        orgs: Mapping[str, Any] | None = None,
        max_body_bytes: int = 1 << 30,
    ):
        self.root = Path(root).resolve()
        self.tokens: dict[str, str] = dict(tokens)
        self.orgs: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in (orgs or {}).items()}
        self.max_body_bytes = int(max_body_bytes)
        self.store = _Store(self.root)
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=2000)
        self.errors: list[str] = []
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._scratch: str | None = None
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> LocalHubServer:
        if self._httpd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        httpd = _HubHTTPServer(self)
        self._httpd = httpd
        self._scratch = tempfile.mkdtemp(prefix="local_hub_clients_")
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"LocalHubServer:{self.port}", daemon=True
        )
        self._thread.start()
        # Safety net: stop when garbage-collected or at interpreter exit, even if `stop()` is never called.
        self._finalizer = weakref.finalize(self, _shutdown, httpd, self._thread, self._scratch)
        return self

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs `_shutdown` once
        self._finalizer = None
        self._httpd = None
        self._thread = None
        self._scratch = None

    def __enter__(self) -> LocalHubServer:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash), to use as ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``."""
        return f"http://127.0.0.1:{self.port}"

    # -- helpers -------------------------------------------------------------------------------------------------

    def token_for(self, user: str) -> str:
        """A valid token of ``user`` (KeyError if none is configured)."""
        for token, name in self.tokens.items():
            if name == user:
                return token
        raise KeyError(f"No token configured for user {user!r}")

    def new_client_home(self) -> Path:
        """A fresh, empty folder (removed by ``stop()``) to use as a client's ``HF_HOME``."""
        if self._scratch is None:
            raise RuntimeError("LocalHubServer is not started")
        return Path(tempfile.mkdtemp(prefix="hf_home_", dir=self._scratch))

    def __repr__(self) -> str:
        where = self.endpoint if self.running else "stopped"
        return f"LocalHubServer({where}, root={str(self.root)!r})"


def _shutdown(httpd: _HubHTTPServer, thread: threading.Thread, scratch: str | None) -> None:
    with contextlib.suppress(Exception):
        httpd.shutdown()  # returns once serve_forever has exited (polls every 0.1 s)
    with contextlib.suppress(Exception):
        httpd.close_all_connections()
    with contextlib.suppress(Exception):
        httpd.server_close()
    thread.join(timeout=5)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def _endpoint_of(server: LocalHubServer | str) -> str:
    return (server.endpoint if isinstance(server, LocalHubServer) else str(server)).rstrip("/")


def hub_env(
    server: LocalHubServer | str,
    token: str | None = None,
    hf_home: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Environment variables that point a (sub)process's ``huggingface_hub``/``transformers`` at ``server``.

    Merge them into a copy of ``os.environ`` for a subprocess: ``{**os.environ, **hub_env(server, token)}``.
    ``token`` is exported as ``HF_TOKEN`` (empty = anonymous; no token file exists in the fresh ``HF_HOME``).
    ``hf_home`` defaults to a fresh folder from ``server.new_client_home()`` (so ``server`` must then be a started
    :class:`LocalHubServer`; with a plain endpoint string, pass ``hf_home``).
    """
    if hf_home is None:
        if not isinstance(server, LocalHubServer):
            raise ValueError("hub_env(endpoint_string, ...) needs an explicit `hf_home` folder")
        hf_home = server.new_client_home()
    home = Path(hf_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    hub_cache = str(home / "hub")
    no_proxy = ",".join(
        dict.fromkeys(
            [p for p in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",") if p.strip()]
            + ["127.0.0.1", "localhost", "::1"]
        )
    )
    return {
        "HF_ENDPOINT": _endpoint_of(server),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_TOKEN": token or "",
        "HUGGING_FACE_HUB_TOKEN": token or "",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HUGGINGFACE_CO_STAGING": "",
        "HF_OIDC_RESOURCE": "",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


# Names derived from the endpoint / HF_HOME at import time, per module (patched only where they exist, so this works
# across huggingface_hub versions).
_HOME_DERIVED_MODULE_ATTRS = (
    ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", "HF_HUB_CACHE"),
    ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", "HF_ASSETS_CACHE"),
    ("huggingface_hub.file_download", "HF_HUB_CACHE", "HF_HUB_CACHE"),
)


@contextlib.contextmanager
def use_local_hub(
    server: LocalHubServer | str,
    token: str | None = None,
    hf_home: str | os.PathLike[str] | None = None,
) -> Iterator[dict[str, str]]:
    """Point this process's ``huggingface_hub`` (and ``transformers``) at ``server`` for the ``with`` block.

    Sets the :func:`hub_env` variables in ``os.environ`` and patches what ``huggingface_hub`` computed from them at
    import time: ``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, every cache/token path
    under ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_DISABLE_XET=True``, ``HF_HUB_OFFLINE=False``, the module-level
    ``HfApi`` used by ``huggingface_hub.model_info`` & co, the trusted redirect origins, and resets the shared HTTP
    session (so proxy settings are re-read). Everything is restored on exit. Yields the environment variables.
    """
    from huggingface_hub import constants  # imported here so that importing this module stays cheap

    # Import now the modules that compute things from the environment at import time (e.g. the module-level
    # `HfApi` behind `huggingface_hub.model_info`), so that they are patched below and restored on exit, rather than
    # first imported inside the block and left pointing at the local server afterwards.
    for module_name in ("huggingface_hub.utils._http", "huggingface_hub.file_download", "huggingface_hub.hf_api"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module_name)

    env = hub_env(server, token=token, hf_home=hf_home)
    endpoint = env["HF_ENDPOINT"]
    home = env["HF_HOME"]
    saved_env = {k: os.environ.get(k) for k in env}
    undo: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        if obj is not None and hasattr(obj, name):
            undo.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    try:
        os.environ.update(env)
        old_home = str(getattr(constants, "HF_HOME", ""))
        # Every string constant under the old HF_HOME (token, caches, marker files...) moves under the new one.
        if old_home:
            for name in dir(constants):
                value = getattr(constants, name)
                if name.isupper() and isinstance(value, str) and value.startswith(old_home + os.sep):
                    patch(constants, name, home + value[len(old_home) :])
                if name.startswith("default_") and isinstance(value, str) and value.startswith(old_home + os.sep):
                    patch(constants, name, home + value[len(old_home) :])
        for name, value in {
            "HF_HOME": home,
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
            "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
            "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
            "HF_XET_CACHE": env["HF_XET_CACHE"],
            "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
            "HF_STORED_TOKENS_PATH": str(Path(home) / "stored_tokens"),
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "_staging_mode": False,
        }.items():
            patch(constants, name, value)
        host = urlsplit(endpoint).hostname or "127.0.0.1"
        if isinstance(getattr(constants, "HF_URL_HOSTS", None), frozenset):
            patch(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host})
        for module_name, attr, const_name in _HOME_DERIVED_MODULE_ATTRS:
            module = sys.modules.get(module_name)
            if module is not None and attr in vars(module):
                patch(module, attr, getattr(constants, const_name))
        http_mod = sys.modules.get("huggingface_hub.utils._http")
        if http_mod is not None and isinstance(getattr(http_mod, "_HUB_ORIGINS", None), frozenset):
            parsed = urlsplit(endpoint)
            origin = (parsed.scheme, host.lower(), parsed.port or (443 if parsed.scheme == "https" else 80))
            patch(http_mod, "_HUB_ORIGINS", http_mod._HUB_ORIGINS | {origin})
        hf_api_mod = sys.modules.get("huggingface_hub.hf_api")
        if hf_api_mod is not None and getattr(hf_api_mod, "api", None) is not None:
            patch(hf_api_mod.api, "endpoint", endpoint)
        for module_name in ("transformers.utils.hub", "transformers.dynamic_module_utils"):
            module = sys.modules.get(module_name)
            if module is not None and isinstance(vars(module).get("HF_MODULES_CACHE"), str):
                patch(module, "HF_MODULES_CACHE", str(Path(home) / "modules"))
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            patch(transformers_hub, "_hf_api", None)  # a shared HfApi bound to the endpoint active when it was made
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:  # `datasets` reads the endpoint and its cache folders at import time
            patch(datasets_config, "HF_ENDPOINT", endpoint)
            for name in ("HF_DATASETS_CACHE", "HF_CACHE_HOME"):
                if isinstance(getattr(datasets_config, name, None), (str, Path)):
                    patch(datasets_config, name, type(getattr(datasets_config, name))(Path(home) / "datasets"))
        _reset_hf_session()
        yield env
    finally:
        _reset_hf_session()
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reset_hf_session() -> None:
    """Drop huggingface_hub's shared HTTP client (it holds pooled connections and proxy settings)."""
    http_mod = sys.modules.get("huggingface_hub.utils._http")
    for name in ("close_session", "reset_sessions"):
        fn = getattr(http_mod, name, None) if http_mod is not None else None
        if callable(fn):
            with contextlib.suppress(Exception):
                fn()
            return


# --------------------------------------------------------------------------------------------------------------------
# pytest fixtures (import them in a test module or conftest: `from hub_server import local_hub`)
# --------------------------------------------------------------------------------------------------------------------

try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    _pytest = None

if _pytest is not None:

    @_pytest.fixture
    def local_hub_server(tmp_path_factory):
        """A started :class:`LocalHubServer` (users ``alice``/``bob``, see ``DEFAULT_TOKENS``); env untouched."""
        with LocalHubServer(tmp_path_factory.mktemp("local_hub"), DEFAULT_TOKENS) as server:
            yield server

    @_pytest.fixture
    def local_hub(local_hub_server):
        """A started :class:`LocalHubServer` with this process's Hub client pointed at it (anonymous by default)."""
        with use_local_hub(local_hub_server):
            yield local_hub_server

else:  # pragma: no cover
    local_hub_server = local_hub = None
