"""Writes that never leave a half-written file or folder behind: a temp sibling, then one rename (torch-free).

Every file clipmoe writes goes to a temporary sibling first and is renamed into place, so a kill never leaves
a half-written file under the real name. When the write itself fails (disk full, file-size limit, I/O error),
the temporary is removed and ``WriteError`` says which file could not be written and why, in one line: it is
a ``ValueError`` as well as an ``OSError``, so the CLI prints it without a traceback.

``escape_field`` writes a name (a file name, a sample key) on one line, unambiguously, for logs and output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any


class WriteError(OSError, ValueError):
    """A file or folder could not be written (disk full, I/O error); its temporary has been removed."""


def io_failure(exc: BaseException) -> str | None:
    """Why ``exc`` is an I/O failure (e.g. ``No space left on device``), or None when it is something else.

    Writers may wrap the ``OSError`` (torch.save raises a RuntimeError whose context is the OSError), so the
    chain of causes is searched. (Everything written through here goes through a Python file object, so a
    failed write is always an ``OSError`` somewhere in that chain.)"""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            return e.strerror or str(e)
        e = e.__cause__ or e.__context__
    return None


def write_error(target: str, reason: str, tmp: str | None = None) -> WriteError:
    """The one-line error for a failed write of ``target`` (its temporary ``tmp`` already removed)."""
    removed = f"; removed the partial {tmp}" if tmp else ""
    return WriteError(f"could not write {target}: {reason}{removed}")


def process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (setting it to read it back would
    briefly give files other threads create that moment the mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # elsewhere: the brief window makes files private, never open to all
    os.umask(umask)
    return umask


def make_shared(path: str, mode: int) -> None:
    """Give a private temporary (``mkstemp`` 0600, ``mkdtemp`` 0700) the mode ``open`` or ``mkdir`` would give a
    new file or folder (``mode`` less the umask): a result, a model or a world is ordinary data the user's group
    may need to read. Best effort: a file system that refuses modes (some network and FUSE mounts) keeps its
    own, and the write goes on."""
    with suppress(OSError):
        os.chmod(path, mode & ~process_umask())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed.
    A failed write (disk full, I/O error) is one ``WriteError`` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise write_error(path, "Is a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.tmp-", suffix=os.path.splitext(path)[1], dir=folder
        )
    except OSError as e:  # a file where a folder should be, no permission: named by the target, not the temporary
        raise _cannot_place(path, e) from e
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        make_shared(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = None if isinstance(e, WriteError) else io_failure(e)
        if reason is not None:
            raise write_error(path, reason, tmp) from e
        raise


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _cannot_place(target: str, e: OSError) -> WriteError:
    """Why no temporary could be made beside ``target``: a file on its path, or the OS's reason."""
    folder = _nearest_existing(os.path.dirname(os.path.abspath(target)))
    if not os.path.isdir(folder):
        return write_error(target, f"{folder} is a file, not a folder")
    return write_error(target, e.strerror or str(e))


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """Refuse, before the work whose result it is to hold, a ``path`` no file can be written at: a folder, or
    under a file or a folder this process may not write into. ``option`` names it in the error."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give a file path")
    ancestor = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(ancestor):
        raise ValueError(f"{option} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write into {ancestor}")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """``obj`` as JSON (non-JSON values written with ``str``), atomically."""
    with atomic_file(path, encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=str)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        f.write(text)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temp folder beside ``target``; on a clean exit it takes ``target``'s place (an existing
    ``target`` is moved aside first and then deleted), on an error it is removed. A failed write inside it
    is one ``WriteError`` naming ``target`` (a ``WriteError`` raised inside, naming one of its files, is
    passed on as it is)."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    except OSError as e:
        raise _cannot_place(target, e) from e
    try:
        yield tmp
        make_shared(tmp, 0o777)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        if old:
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = None if isinstance(e, WriteError) else io_failure(e)
        if reason is not None:
            raise write_error(target, reason, tmp) from e
        raise


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_field(text: str) -> str:
    r"""``text`` on one line, unambiguously: backslash, tab, newline, carriage return and other unprintable
    characters are written as C-style escapes (``\\``, ``\t``, ``\n``, ``\r``, ``\xNN``, ``\uNNNN``). A byte
    of a non-UTF-8 file name (decoded by Python as a surrogate) comes out as ``\xNN``, that byte."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)
