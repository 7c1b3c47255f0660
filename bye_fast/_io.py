"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A reader never sees a half-written file and a failure leaves no temp file behind.
The file gets the permissions a plain ``open`` would give it (``0o666 & ~umask``),
not ``mkstemp``'s owner-only ``0o600``: results are meant to be shared and audited.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "default_file_mode", "write_json_atomic"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: ``0o666`` less the umask."""
    try:  # Linux: read it without changing it (setting it, even briefly, races other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            if hasattr(os, "fchmod"):  # POSIX
                with contextlib.suppress(OSError):  # a file system that refuses chmod keeps mkstemp's mode
                    os.fchmod(f.fileno(), default_file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump`` to ``path`` atomically (``indent=1`` unless given)."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)
    return Path(path)
