"""Byte-stable writers for the ordinary on-disk formats the generated world uses.

Same content in, same bytes out: tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644, no user
names) in the order they are added; PNGs carry no timestamp chunk; JSON keys are sorted.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile

from PIL import Image


def img2dataset_key(index: int, shard_size: int) -> tuple[str, str]:
    """(shard folder, key) of sample ``index`` exactly as img2dataset names them: the key is the shard id
    followed by the index in the shard, zero-padded (``00000``, ``000000000`` for 10000-sample shards)."""
    digits = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    shard, position = divmod(index, shard_size)
    return f"{shard:05d}", f"{shard * 10**digits + position:0{digits + 5}d}"


def wds_key(index: int) -> str:
    """Sample key in CLIP_benchmark's webdataset exports (``s0000000``)."""
    return f"s{index:07d}"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def json_text(obj: object, indent: int | None = None) -> str:
    return json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False)


def write_file(path: str, data: bytes | str) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


class ShardedTarWriter:
    """``<folder>/0.tar, 1.tar, ...`` holding ``per_shard`` samples each, plus ``nshards.txt`` on close:
    the split layout CLIP_benchmark's webdataset loader reads."""

    def __init__(self, folder: str, per_shard: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder, self.per_shard = folder, per_shard
        self.samples, self.shards = 0, 0
        self._tar: tarfile.TarFile | None = None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """One sample: its files (``KEY.ext``, bytes), kept together and in this order."""
        if self.samples % self.per_shard == 0:
            self._close_tar()
            path = os.path.join(self.folder, f"{self.shards}.tar")
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self.shards += 1
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        self._close_tar()
        write_file(os.path.join(self.folder, "nshards.txt"), f"{self.shards}\n")
