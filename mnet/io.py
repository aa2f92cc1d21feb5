"""Atomic file writes and small JSON helpers shared by every stage.

Checkpoints, tables and cards are written to a temporary file in the same directory and renamed
over the target, so a crash never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mnet.errors import CheckpointError

__all__ = ["atomic_path", "write_json", "read_json", "write_text", "sha256_file", "process_umask"]


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux 4.7+), or None where that is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# os.umask can only read the mask by setting it, and a file another thread creates meanwhile gets the
# temporary mask; so read /proc where it exists and fall back to setting it only once, at import.
_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = os.umask(0o022)
    os.umask(_IMPORT_UMASK)


def process_umask() -> int:
    """The process umask, read without changing it (the value at import where /proc is unavailable)."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    mkstemp makes 0600 files; the file gets the mode a plain open() would (0666 & ~umask), so bundles
    and checkpoints copied to another machine or user stay readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mode = 0o666 & ~process_umask()
    os.chmod(tmp, mode)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # again: a writer may have replaced the temp file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or corrupt file into a CheckpointError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); regenerate the {what}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
