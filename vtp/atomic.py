"""Files that are either wholly written or not there: the one place that writes them.

Every file the project leaves on disk (saved models, plans, checkpoints, metrics, configs,
benchmark records) goes through here. A write lands in a temporary sibling that is flushed
to disk and then renamed over the target, so a crash or a kill leaves either the old
content or the new one, never half of one, and no temporary file behind.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Union

__all__ = ["atomic_write", "write_text", "write_json", "replace_directory", "recover_directory"]

PathLike = Union[str, os.PathLike]


def _sibling_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-"


def _temporary_sibling(path: Path, kind: str) -> Path:
    # Unique per call, not only per process: two threads of one process may write siblings.
    return path.parent / f"{_sibling_prefix(path, kind)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    renaming that into place once it is complete and on disk."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target, "tmp")
    try:
        write(str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    orphans = sorted(target.parent.glob(_sibling_prefix(target, "old") + "*"), key=lambda p: p.stat().st_mtime)
    if not orphans:
        return False
    os.rename(orphans[-1], target)
    return True


def replace_directory(path: PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the directory ``path`` with what ``fill(tmp_dir)`` writes into a
    fresh temporary directory beside it; an interruption leaves the old directory or the new
    one (between the two renames a replacement needs, the old one under a temporary name,
    which ``recover_directory`` puts back: the next replacement and ``vtp.load`` call it).
    Returns ``path`` as a Path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = _temporary_sibling(target, "tmp")
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
    old = None
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
    return target
