"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A reader never sees a half-written file and a failure leaves no temp file behind.
The file gets the permissions a plain ``open`` would give it (``0o666 & ~umask``),
not ``mkstemp``'s owner-only ``0o600``: results are meant to be shared and audited.
:func:`atomic_folder` does the same for a whole folder, and :func:`read_json`
reads a JSON file with errors that name it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_folder", "atomic_write", "default_file_mode", "read_json", "write_json_atomic"]


def _umask() -> int:
    """The process umask, read without changing it where possible."""
    try:  # Linux: read it without changing it (setting it, even briefly, races other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temp folder beside ``path``; on success it takes ``path``'s place.

    Yields the temp folder to write into. On success an existing ``path`` (the
    caller decides whether it may be replaced) is first renamed aside, the new
    folder renamed into place, then the old one deleted; if that rename fails,
    the old folder is put back. On error (also an interrupt) the temp folder is
    deleted and ``path`` is untouched, so a reader sees the old folder or the
    new one, complete, never a mix. A process killed outright can leave the
    hidden temp folder ``.<name>.tmp-*`` beside ``path``, never a partial ``path``.
    The folder gets the permissions ``mkdir`` would give it, not ``mkdtemp``'s ``0o700``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value in ``path`` (UTF-8, an optional BOM); ``ValueError`` naming the file and ``what`` it
    should have been when it is not UTF-8 text or not valid JSON. ``OSError`` as ``open`` raises it."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        kind = " (it is a zip archive, e.g. a .npz file)" if raw[:4] == b"PK\x03\x04" else ""
        raise ValueError(
            f"{path}: not a {what}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}){kind}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not a {what}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
