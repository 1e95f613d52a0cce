"""Writes that never leave a half-written file or folder behind: a temp sibling, then one rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """``obj`` as JSON (non-JSON values written with ``str``), atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, default=str)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        f.write(text)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temp folder beside ``target``; on a clean exit it takes ``target``'s place (an existing
    ``target`` is moved aside first and then deleted), on an error it is removed."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
