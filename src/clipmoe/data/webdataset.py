"""The one webdataset tar reader, for training data (``data.readers``) and evaluation sets (``eval.datasets``).

A shard is read once, headers only: every sample's members are located by byte offset, so images are decoded
later by random access into the uncompressed tar (no extraction). The shard must still read as webdataset
reads it, in one stream: a sample's members side by side, each once (see ``index_tar``).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from ..utils.keys import first_few


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
    webdataset metadata (names starting with ``__``) is skipped. Data that would be silently wrong is a
    ``TarError`` naming the file and the members: the same sample file twice (which copy is the sample's?),
    a key that comes back after other keys (webdataset, grouping consecutive members, would yield that sample
    twice); so is a compressed or broken tar."""
    path = os.fspath(path)
    samples: dict[str, dict[str, Member]] = {}
    duplicates: list[str] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed: random access by offset needs the raw tar
            for member in tar:
                if not member.isfile() or os.path.basename(member.name).startswith("__"):
                    continue
                key, ext = split_key(member.name)
                if key != last and key in samples:
                    raise TarError(f"{path}: sample {key!r} appears twice (again at member {member.name!r})")
                last = key
                sample = samples.setdefault(key, {})
                if ext in sample:
                    duplicates.append(f"{sample[ext].name} and {member.name}")
                    continue
                sample[ext] = Member(member.offset_data, member.size, member.name)
            end = tar.offset  # where tarfile stopped: the end-of-archive marker, or a header it could not read
    except tarfile.TarError as e:
        raise TarError(f"{path} is not a readable uncompressed tar: {e}") from None
    _check_archive_end(path, end)
    if duplicates:
        raise TarError(
            f"{path} holds the same sample file twice ({first_few(duplicates, 5)}); a key must name one sample: "
            "remove the duplicates or rename them"
        )
    return samples


# After its last member a tar holds its end-of-archive marker (two zero blocks), then zeros up to a whole
# record (Python's tarfile and GNU tar: 20 blocks).
_END_BLOCK, _MOST_ZEROS = 512, 2 * 512 + 20 * 512


def _check_archive_end(path: str, end: int) -> None:
    """tarfile reads a cut or damaged header, or a zeroed tail, as the end of the archive and says nothing:
    every sample after it would be lost silently. What follows the last member must be the end marker."""
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read(_MOST_ZEROS + 1)
    where = f"{path}: after byte {end}"
    if len(rest) < _END_BLOCK or rest[:_END_BLOCK].count(0) != _END_BLOCK:
        what = "the file ends there" if not rest else "what follows is not a tar header it can read"
        raise TarError(f"{where} the tar has no end-of-archive marker ({what}): a cut or damaged copy?")
    if rest.count(0) != len(rest) or len(rest) > _MOST_ZEROS:
        raise TarError(
            f"{where} comes more than the end-of-archive marker and its padding: damaged or zeroed data (a copy"
            " that did not finish?); its samples would be lost"
        )


def read_member(f: BinaryIO, member: Member) -> bytes:
    """The bytes of ``member`` from the shard opened as ``f`` (``open(path, "rb")``)."""
    f.seek(member.offset)
    return f.read(member.size)
