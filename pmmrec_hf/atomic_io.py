"""Atomic outputs: every folder or file the package writes appears complete or not at all.

A folder is built in a temporary sibling (``.<name>.pmmrec-tmp``), its files are flushed to disk, a
completeness marker (:data:`MARKER`, a manifest of every file and its size) is written last, and the
folder is renamed into place. An existing version is replaced by renaming it aside
(``.<name>.pmmrec-old``), renaming the new one in, then deleting the old one, so at every moment either
the old or the new complete version exists under one of the two names:

* a kill before the swap leaves the old version in place and a stale temporary folder (deleted by the
  next write of the same target);
* a kill between the two renames leaves only the aside folder: :func:`resolve_folder` (used by the
  loaders) reads it with a warning, and the next write of the target renames it back first
  (:func:`recover`);
* a kill after the swap leaves the new version and the aside one, deleted by :func:`recover`.

A single file is written to a temporary sibling, flushed and ``os.replace``-d into place.

One writer at a time: a folder write (:class:`AtomicFolder`, :class:`InPlaceWrite`) holds an exclusive lock
on ``.<name>.pmmrec-lock`` (a sibling, ``fcntl.flock``; removed when the write ends) from ``begin`` to
``commit`` / ``abort``. A second process writing the same target meanwhile gets a :class:`ConcurrentWriteError`
naming the target and the lock, and touches nothing (it would otherwise delete the first one's temporary
folder as a leftover). The lock dies with its process, so a killed write never blocks the next one. Where
``fcntl`` is missing (Windows) there is no lock.

A model folder (``save_pretrained``) may share its folder with other outputs (a training run's folder holds
its checkpoints and logs too), so it is not swapped whole: :class:`InPlaceWrite` builds the files in a
temporary sibling, records the write in ``<folder>/.pmmrec-writing.json``, moves the files it replaces
into ``<folder>/.pmmrec-previous/``, moves the new ones in, writes the marker and removes the record. A
folder holding the record is an interrupted write: :func:`recover_in_place` (run by the loaders and by the
next write) puts the previous files back.

Kill tests: the environment variable :data:`KILL_ENV` (``PMMREC_TEST_KILL_AT=<boundary>[:<n>]``) kills the
process (SIGKILL) at the n-th (default first) time it reaches the write boundary ``<boundary>``, one of
:data:`WRITE_BOUNDARIES` (any other value, e.g. ``count``, kills nothing; the times each boundary was reached
are counted in ``_hits``). It is a test hook; nothing else reads it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

#: The completeness marker written last into every folder output (a JSON manifest: file -> size).
MARKER = ".pmmrec-complete.json"
MARKER_FORMAT = "pmmrec_hf.complete/1"
WRITING_RECORD = ".pmmrec-writing.json"
PREVIOUS_FOLDER = ".pmmrec-previous"
TMP_SUFFIX = ".pmmrec-tmp"
ASIDE_SUFFIX = ".pmmrec-old"
LOCK_SUFFIX = ".pmmrec-lock"
KILL_ENV = "PMMREC_TEST_KILL_AT"

#: Every point of a write where a kill test stops the process (see the module docstring).
WRITE_BOUNDARIES = (
    "folder_begun",  # the temporary folder exists (empty)
    "file_written",  # after each file of a folder output is written (and after a carried-over file is linked)
    "before_marker",  # every file flushed, no marker yet
    "before_rename",  # marker written, the target not touched yet
    "after_rename_aside",  # the old version renamed aside, the new one not in place yet
    "after_rename",  # the new version in place, the old one not deleted yet
    "file_tmp_written",  # a single-file output: the temporary file written, not renamed yet
    "file_moved_aside",  # in-place write: after each replaced file is moved into .pmmrec-previous/
    "before_record_removed",  # in-place write: every new file and the marker in place, the record not removed
)

_hits: dict[str, int] = {}


def boundary(name: str) -> None:
    """A write boundary: kill the process here when the test hook asks for it."""
    if name not in WRITE_BOUNDARIES:  # pragma: no cover - a bug
        raise ValueError(f"unknown write boundary {name!r}")
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    _hits[name] = _hits.get(name, 0) + 1  # every boundary is counted (a test reads the counts of a whole write)
    target, _, count = wanted.partition(":")
    if target == name and _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def tmp_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}{TMP_SUFFIX}")


def aside_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}{ASIDE_SUFFIX}")


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def is_work_name(name: str) -> bool:
    """A temporary or aside folder or the lock of an atomic write (never a complete output under its own name)."""
    return name.startswith(".") and (name.endswith((TMP_SUFFIX, ASIDE_SUFFIX, LOCK_SUFFIX)))


class ConcurrentWriteError(OSError):
    """Another process is writing the same target right now (an OSError: the command-line tools report it as one
    line, like a permission error)."""


class WriteLock:
    """The exclusive lock of one target's write (see the module docstring): ``acquire()`` raises
    :class:`ConcurrentWriteError` at once when another process holds it; ``release()`` removes the lock file."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise ConcurrentWriteError(
                    f"Another process is writing {self.target} right now (it holds {self.path}); nothing was "
                    "written. Wait for it to finish, or write to another path.") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._fd = fd
                return
            os.close(fd)  # its holder removed that file as it released it: lock the new one

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker's manifest of a folder, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete atomic output (no marker, a listed file missing or of another size),
    or None when it is complete."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return f"it has no completeness marker {MARKER}"
    for name, size in (marker.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} (listed in {MARKER}) is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MARKER} says {size}"
    return None


def is_complete(folder: str | os.PathLike) -> bool:
    return incomplete_reason(folder) is None


def recover(target: str | os.PathLike) -> None:
    """Finish or undo an interrupted swap of `target`: an aside folder is renamed back when the target is
    missing (the previous version), deleted when the target exists; a leftover temporary folder is deleted."""
    target = Path(target)
    aside = aside_path(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            logger.warning("Restoring %s from %s (an earlier write was interrupted).", target, aside)
            os.replace(aside, target)
    tmp = tmp_path(target)
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def resolve_folder(folder: str | os.PathLike) -> Path:
    """The folder a reader should read for `folder`: `folder` itself, or, when it is missing and an
    interrupted write left the previous complete version aside, that one (with a warning)."""
    folder = Path(folder)
    if not folder.exists():
        aside = aside_path(folder)
        if aside.is_dir() and is_complete(aside):
            logger.warning("%s is missing: an interrupted write left its previous version at %s; reading that.",
                           folder, aside)
            return aside
    return folder


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(folder: str | os.PathLike) -> None:
    """Write `folder`'s completeness marker: every file under it with its size (also for marking a folder
    made by hand complete)."""
    folder = Path(folder)
    manifest = {"format": MARKER_FORMAT,
                "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in _files(folder)}}
    marker = folder / MARKER
    marker.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    _fsync_file(marker)
    _fsync_dir(folder)


class AtomicFolder:
    """One atomic write of the folder `target` (see the module docstring).

    ``begin()`` prepares and returns the empty temporary folder; write into it, then ``commit()``
    (or ``abort()``). `carry_over(name)`: files of the existing version (relative paths) for which it
    returns True are linked into the new version when the new one does not write them (so saving a
    model into a folder keeps, say, the tokenizer saved there before). Only the process that calls
    ``begin`` / ``commit`` touches the target; other processes may write into :attr:`path` between the two."""

    def __init__(self, target: str | os.PathLike, carry_over: Callable[[str], bool] | None = None):
        self.target = Path(target)
        self.path = tmp_path(self.target)
        self.carry_over = carry_over
        self.lock = WriteLock(self.target)

    def begin(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"{self.target} exists and is a file, not a folder: not writing over it.")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            recover(self.target)
            self.path.mkdir()
        except BaseException:
            self.lock.release()
            raise
        boundary("folder_begun")
        return self.path

    def commit(self) -> Path:
        """Carry over, flush, write the marker, swap the folder in; returns the target."""
        try:
            return self._commit()
        finally:
            self.lock.release()

    def _commit(self) -> Path:
        if self.carry_over is not None and self.target.is_dir():
            for old in _files(self.target):
                rel = old.relative_to(self.target).as_posix()
                new = self.path / rel
                if new.exists() or not self.carry_over(rel):
                    continue
                new.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(old, new)
                except OSError:
                    shutil.copy2(old, new)
                boundary("file_written")
        for path in _files(self.path):
            _fsync_file(path)
        boundary("before_marker")
        write_marker(self.path)
        boundary("before_rename")
        aside = aside_path(self.target)
        if self.target.exists():
            os.replace(self.target, aside)
            boundary("after_rename_aside")
        os.replace(self.path, self.target)
        _fsync_dir(self.target.parent)
        boundary("after_rename")
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.release()


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, carry_over: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """``with atomic_folder(target) as tmp: <write files into tmp>``: on a normal exit the folder is committed
    (marker written, renamed into place, the previous version replaced); on an exception it is discarded
    and the previous version stays."""
    writer = AtomicFolder(target, carry_over)
    path = writer.begin()
    try:
        yield path
    except BaseException:
        writer.abort()
        raise
    writer.commit()


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp: <write tmp>``: the file appears at `path` complete (flushed, then
    ``os.replace``-d over any previous version) or not at all."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder, not a file: not writing over it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(target)  # one name per target: a leftover of a killed write is replaced here
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        _fsync_file(tmp)
        boundary("file_tmp_written")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# in-place writes (a set of files inside a folder that may hold other things)


_WEIGHTS = re.compile(r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                      r"(\.index\.json)?$")


def is_weights_file(name: str) -> bool:
    """A transformers weights file or shard index at the top of a model folder (``model.safetensors``,
    ``model-00001-of-00003.safetensors``, ``pytorch_model.bin.index.json``, ...)."""
    return bool(_WEIGHTS.match(name))


def _is_bookkeeping(name: str) -> bool:
    top = name.split("/")[0]
    return top in (MARKER, WRITING_RECORD, PREVIOUS_FOLDER)


def recover_in_place(folder: str | os.PathLike) -> bool:
    """Undo an interrupted :class:`InPlaceWrite` of `folder`: the new files it had moved in are removed and
    the previous ones put back. Returns whether there was one to undo."""
    folder = Path(folder)
    record_path = folder / WRITING_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError:  # killed while writing the record itself: nothing was moved yet
        record = {"files": []}
    previous = folder / PREVIOUS_FOLDER
    tmp = tmp_path(folder)
    logger.warning("%s: undoing an interrupted save (restoring the previous files).", folder)
    new_files = set(record.get("new_files", []))
    for name in record.get("files", []):
        current, old = folder / name, previous / name
        if old.exists():  # moved aside: put it back (over the new file, if that was moved in already)
            current.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, current)
        elif name in new_files and current.exists() and not (tmp / name).exists():
            current.unlink()  # a new file moved in, with no previous version
        # else: the previous file was never moved (or there is none): leave it
    old_marker = previous / MARKER
    if old_marker.exists():
        os.replace(old_marker, folder / MARKER)
    elif record.get("had_marker") is False:
        (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(previous, ignore_errors=True)
    record_path.unlink()
    _fsync_dir(folder)
    return True


class InPlaceWrite:
    """An atomic write of a set of files into `target`, a folder that may hold other files and folders
    (which are kept). ``begin()`` returns an empty temporary folder to write the files into; ``commit()``
    moves them in (see the module docstring). `replaces(name)`: files of the target that the new version
    supersedes even when it does not write them (e.g. weight shards of an earlier save)."""

    def __init__(self, target: str | os.PathLike, replaces: Callable[[str], bool] | None = None):
        self.target = Path(target)
        self.path = tmp_path(self.target)
        self.replaces = replaces
        self.lock = WriteLock(self.target)

    def begin(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"{self.target} exists and is a file, not a folder: not writing over it.")
        self.target.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            recover_in_place(self.target)
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
        except BaseException:
            self.lock.release()
            raise
        boundary("folder_begun")
        return self.path

    def commit(self) -> Path:
        try:
            return self._commit()
        finally:
            self.lock.release()

    def _commit(self) -> Path:
        new_files = [p.relative_to(self.path).as_posix() for p in _files(self.path)]
        new_files = [n for n in new_files if not _is_bookkeeping(n)]
        for name in new_files:
            _fsync_file(self.path / name)
        superseded = []
        if self.replaces is not None:
            superseded = [p.relative_to(self.target).as_posix() for p in _files(self.target)]
            superseded = [n for n in superseded if not _is_bookkeeping(n) and n not in new_files and self.replaces(n)]
        names = new_files + superseded
        had_marker = (self.target / MARKER).exists()
        record = {"format": MARKER_FORMAT, "files": names, "new_files": new_files, "had_marker": had_marker}
        (self.target / WRITING_RECORD).write_text(json.dumps(record), encoding="utf-8")
        _fsync_file(self.target / WRITING_RECORD)
        _fsync_dir(self.target)
        boundary("before_rename")
        previous = self.target / PREVIOUS_FOLDER
        if previous.exists():
            shutil.rmtree(previous)
        previous.mkdir()
        for name in names + ([MARKER] if had_marker else []):
            old = self.target / name
            if old.exists():
                (previous / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, previous / name)
                boundary("file_moved_aside")
        for name in new_files:
            (self.target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / name, self.target / name)
            boundary("file_written")
        manifest = {"format": MARKER_FORMAT,
                    "files": {n: (self.target / n).stat().st_size for n in new_files}}
        marker = self.target / MARKER
        marker.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_file(marker)
        _fsync_dir(self.target)
        boundary("before_record_removed")
        (self.target / WRITING_RECORD).unlink()
        _fsync_dir(self.target)
        boundary("after_rename")
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(self.path, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.release()


@contextlib.contextmanager
def in_place_write(target: str | os.PathLike, replaces: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """``with in_place_write(folder) as tmp: <write files into tmp>``: see :class:`InPlaceWrite`."""
    writer = InPlaceWrite(target, replaces)
    path = writer.begin()
    try:
        yield path
    except BaseException:
        writer.abort()
        raise
    writer.commit()
