"""Atomic file writes with one clear error on disk-full and other I/O failures (torch-free).

Every file clipmoe writes goes to a temporary sibling first and is renamed into place, so a kill never leaves
a half-written file under the real name. When the write itself fails (disk full, file-size limit, I/O error),
the temporary is removed and ``WriteError`` says which file could not be written and why, in one line: it
is a ``ValueError`` as well as an ``OSError``, so the CLI prints it without a traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO


class WriteError(OSError, ValueError):
    """A file or folder could not be written (disk full, I/O error); its temporary has been removed."""


def io_failure(exc: BaseException) -> str | None:
    """Why ``exc`` is an I/O failure (e.g. ``No space left on device``), or None when it is something else.

    Writers wrap the ``OSError``: torch.save raises a RuntimeError whose context is the OSError, safetensors a
    SafetensorError saying ``I/O error: ...``."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            return e.strerror or str(e)
        e = e.__cause__ or e.__context__
    text = (str(exc).splitlines() or [""])[0]
    if "I/O error" not in text:
        return None
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    return text.partition("I/O error: ")[2].partition(" (os error")[0][:200] or text[:200]


def write_error(target: str, reason: str, tmp: str | None = None) -> WriteError:
    """The one-line error for a failed write of ``target`` (its temporary ``tmp`` already removed)."""
    removed = f"; removed the partial {tmp}" if tmp else ""
    return WriteError(f"could not write {target}: {reason}{removed}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "wb", **open_kwargs) -> None:
    """Call ``write(f)`` on a temporary sibling of ``path`` opened with ``mode``, then rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = io_failure(e)
        if reason is not None:
            raise write_error(path, reason, tmp) from e
        raise


def remove_tree(path: str) -> None:
    """Remove a temporary folder, ignoring errors (it may be half-written)."""
    shutil.rmtree(path, ignore_errors=True)


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
