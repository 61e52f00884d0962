"""Files that are either wholly written or not there: the one place that writes them.

Every file the project leaves on disk (saved models, plans, checkpoints, metrics, configs,
benchmark records) goes through here. A write lands in a temporary sibling that is flushed
to disk and then renamed over the target, so a crash or a kill leaves either the old
content or the new one, never half of one. A process killed outright (SIGKILL, a lost
machine) cannot remove its temporary sibling: the next write of the same target removes
it, and ``remove_interrupted_writes`` tidies a whole folder (what a resumed run calls).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Union

__all__ = ["atomic_write", "write_text", "write_json", "replace_directory", "recover_directory",
           "remove_interrupted_writes"]

PathLike = Union[str, os.PathLike]

# A temporary sibling of `target` is `.<target>.<kind>-<pid>-<8 hex digits>`: the name says
# whose it is, so that one left by a dead process can be told from one being written.
_SIBLING = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")

# The temporaries this process is writing now (several threads may write at once): a
# sibling with this process's id that is not among them was left by a killed process
# that had the same id (ids are reused, in containers especially).
_in_flight: Set[str] = set()
_in_flight_lock = threading.Lock()


def _sibling_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-"


def _temporary_sibling(path: Path, kind: str) -> Path:
    # Unique per call, not only per process: two threads of one process may write siblings.
    tmp = path.parent / f"{_sibling_prefix(path, kind)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _in_flight_lock:
        _in_flight.add(str(tmp))
    return tmp


def _done_with(tmp: Optional[Path]) -> None:
    if tmp is not None:
        with _in_flight_lock:
            _in_flight.discard(str(tmp))


def _writer_is_running(path: Path, pid: int) -> bool:
    """Whether the process that named the temporary `path` may still be writing it."""
    if pid == os.getpid():
        with _in_flight_lock:
            return str(path) in _in_flight
    if os.name != "posix":
        return True  # no harmless way to ask: keep it (os.kill would end the process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _stale_siblings(folder: Path, target: Optional[str] = None) -> Dict[str, Dict[str, List[Path]]]:
    """target name -> kind ('tmp' or 'old') -> the temporaries of writes no running process
    is doing any more (of `target` alone when given), oldest first."""
    found: Dict[str, Dict[str, List[Path]]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if not match or (target is not None and match["target"] != target):
            continue
        path = folder / entry.name
        if _writer_is_running(path, int(match["pid"])):
            continue
        found.setdefault(match["target"], {}).setdefault(match["kind"], []).append(path)
    for kinds in found.values():
        for paths in kinds.values():
            paths.sort(key=_mtime)
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _tidy(folder: Path, target: Optional[str] = None) -> List[Path]:
    """Puts back a directory a killed replacement left under its old name (the newest, if
    the target is missing) and removes every other temporary of a killed write."""
    removed = []
    for name, kinds in _stale_siblings(folder, target).items():
        olds = kinds.get("old", [])
        if olds and not (folder / name).exists():
            os.rename(olds.pop(), folder / name)
        for path in kinds.get("tmp", []) + olds:
            _remove(path)
            removed.append(path)
    return removed


def remove_interrupted_writes(folder: PathLike) -> List[Path]:
    """Finishes what killed writes left in ``folder``: a directory a replacement had moved
    aside goes back in place when nothing replaced it, and every temporary file or
    directory of a write whose process is gone is removed. Returns what was removed;
    temporaries of writes still running (in this process or another) are left alone."""
    return _tidy(Path(folder))


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk, where the OS allows it (a folder's fsync
    is what makes a rename inside it survive a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` by calling ``write(tmp)`` on a temporary path beside it and
    renaming that into place once it is complete and on disk. Temporaries that killed
    writes of ``path`` left behind are removed first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _tidy(target.parent, target.name)
    tmp = _temporary_sibling(target, "tmp")
    try:
        write(str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
        _done_with(tmp)


def write_text(path: PathLike, text: str) -> None:
    """Create or replace a UTF-8 text file, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: PathLike, data: Any, indent: int = 1) -> None:
    """Create or replace a JSON file, atomically. The data is serialised before anything is
    written, so a value JSON cannot hold leaves the old file untouched."""
    write_text(path, json.dumps(data, indent=indent))


def recover_directory(path: PathLike) -> bool:
    """Put back the old directory a replacement killed between its two renames left under a
    temporary name; True when it did."""
    target = Path(path)
    if target.exists() or not target.parent.is_dir():
        return False
    orphans = _stale_siblings(target.parent, target.name).get(target.name, {}).get("old", [])
    if not orphans:
        return False
    os.rename(orphans[-1], target)
    return True


def replace_directory(path: PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the directory ``path`` with what ``fill(tmp_dir)`` writes into a
    fresh temporary directory beside it; an interruption leaves the old directory or the new
    one (between the two renames a replacement needs, the old one under a temporary name,
    which ``recover_directory`` puts back: the next replacement and ``vtp.load`` call it).
    The next replacement also removes what killed ones left beside ``path``.
    Returns ``path`` as a Path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _tidy(target.parent, target.name)
    tmp = _temporary_sibling(target, "tmp")
    old = None
    try:
        tmp.mkdir()
        try:
            fill(tmp)
            for child in tmp.iterdir():
                _fsync_path(child)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Two renames: POSIX cannot swap directories in one. Between them the old directory
        # sits beside the target under a temporary name and is put back if the second fails.
        if target.exists():
            old = _temporary_sibling(target, "old")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _done_with(tmp)
        _done_with(old)
    return target
