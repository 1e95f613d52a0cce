"""The one webdataset tar reader, for training data (``data.readers``) and evaluation sets (``eval.datasets``).

A shard is read once, headers only: every sample's members are located by byte offset, so images are decoded
later by random access into the uncompressed tar (no extraction, no streaming order imposed).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO


class TarError(ValueError):
    """A shard that cannot be read as an uncompressed webdataset tar."""


@dataclass(frozen=True)
class Member:
    offset: int  # byte offset of the member's data in the tar
    size: int
    name: str  # its path inside the tar


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest (lower-cased) the
    extension: ``"a/b.seg.png"`` -> ``("a/b", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(path: str | os.PathLike) -> dict[str, dict[str, Member]]:
    """``{key: {extension: Member}}`` of every sample in the shard, in the order of its first member.
    webdataset metadata (names starting with ``__``) is skipped; a sample with two members of one extension, a
    compressed or broken tar is a ``TarError`` naming the file."""
    path = os.fspath(path)
    samples: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed: random access by offset needs the raw tar
            for member in tar:
                if not member.isfile() or os.path.basename(member.name).startswith("__"):
                    continue
                key, ext = split_key(member.name)
                sample = samples.setdefault(key, {})
                if ext in sample:
                    raise TarError(f"{path}: sample {key!r} has two '.{ext}' files")
                sample[ext] = Member(member.offset_data, member.size, member.name)
    except tarfile.TarError as e:
        raise TarError(f"{path} is not a readable uncompressed tar: {e}") from None
    return samples


def read_member(f: BinaryIO, member: Member) -> bytes:
    """The bytes of ``member`` from the shard opened as ``f`` (``open(path, "rb")``)."""
    f.seek(member.offset)
    return f.read(member.size)
