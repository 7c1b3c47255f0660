"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A reader never sees a half-written file and a failure leaves no temp file behind.
The file gets the permissions a plain ``open`` would give it (``0o666 & ~umask``),
not ``mkstemp``'s owner-only ``0o600``: results are meant to be shared and audited
(a file system that refuses ``chmod`` keeps ``mkstemp``'s mode; that is not an error).
:func:`atomic_folder` does the same for a whole folder, and :func:`read_json`
reads a JSON file with errors that name it. Writers that place several outputs
as one transaction (``bye_fast.filter``) use the parts: :func:`temp_file`,
:func:`temp_folder`, :func:`place` and :func:`fsync_dir`.
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

__all__ = [
    "atomic_folder",
    "atomic_write",
    "default_file_mode",
    "fsync_dir",
    "place",
    "read_json",
    "remove",
    "temp_file",
    "temp_folder",
    "write_json_atomic",
]


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
def temp_file(
    path: str | os.PathLike,
    mode: str = "w",
    suffix: str = ".tmp",
    *,
    file_mode: int | None = None,
    **open_kwargs: Any,
) -> Iterator[tuple[IO, Path]]:
    """A temp file beside ``path``, for a writer that renames it itself: yields ``(file, temp path)``.

    On success the file is flushed, fsync'ed, closed and left for the caller to
    :func:`place`; on error (also an interrupt) it is removed. ``file_mode``: its
    permission bits (default :func:`default_file_mode`). ``open_kwargs`` go to ``open``
    (``encoding``, ``newline``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            if hasattr(os, "fchmod"):  # POSIX
                with contextlib.suppress(OSError):  # a file system that refuses chmod keeps mkstemp's mode
                    os.fchmod(f.fileno(), default_file_mode() if file_mode is None else file_mode)
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", suffix: str = ".tmp", **kwargs: Any
) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it is removed.

    ``kwargs`` as for :func:`temp_file` (``file_mode``, ``encoding``, ``newline``).
    """
    with temp_file(path, mode, suffix, **kwargs) as (f, tmp):
        yield f
    try:
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(Path(path).parent)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump`` to ``path`` atomically (``indent=1`` unless given)."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)
    return Path(path)


@contextlib.contextmanager
def temp_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``path`` (hidden, ``.<name>.tmp-*``) for a writer that renames it itself.

    On success it is left for the caller to :func:`place`; on error (also an
    interrupt) it is deleted. It gets the permissions ``mkdir`` would give it, not
    ``mkdtemp``'s ``0o700``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` (a file, or a folder) to ``path``, on the same file system.

    A file replaces ``path`` with one ``os.replace``. A folder that would
    replace an existing ``path`` first renames that aside (``.<name>.old-*``),
    then renames itself into place and deletes the old one; if its own rename
    fails, the old one is put back. The caller decides whether ``path`` may be
    replaced.
    """
    tmp, path = Path(tmp), Path(path)
    if not tmp.is_dir() or not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder; nothing there is not an error."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows it."""
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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temp folder beside ``path``; on success it takes ``path``'s place.

    Yields the temp folder to write into. On success an existing ``path`` (the
    caller decides whether it may be replaced) is first renamed aside, the new
    folder renamed into place, then the old one deleted; if that rename fails,
    the old folder is put back (:func:`place`). On error (also an interrupt) the temp folder is
    deleted and ``path`` is untouched, so a reader sees the old folder or the
    new one, complete, never a mix. A process killed outright can leave the
    hidden temp folder ``.<name>.tmp-*`` beside ``path``, never a partial ``path``.
    The folder gets the permissions ``mkdir`` would give it, not ``mkdtemp``'s ``0o700``.
    """
    with temp_folder(path) as tmp:
        yield tmp
        place(tmp, path)  # a failure here deletes the temp folder too


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
