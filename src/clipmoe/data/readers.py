"""Image-caption readers: one map-style dataset over img2dataset folders, webdataset tars, CSV/TSV, JSONL and
ShareGPT4V JSON.

Every format is indexed once, up front, into a list of ``Record`` (key, caption, where the image bytes are).
That gives random access by index (the MCL sampler draws a batch from one cluster; the embedding pass writes
features back by index) and lets cheap problems (no image, no or empty caption) be found before any
training starts. Tar members are indexed by their byte offset, so a webdataset shard is read with one
``seek`` + ``read`` per sample, never extracted.

Bad samples are skipped, counted and named in a ``SkipLog``:

* at indexing time (main process): missing image, missing/empty/unreadable caption, malformed record, a
  CSV/TSV/JSONL row or ShareGPT4V record that is not UTF-8 (that row only), a webdataset key with a dot in it
  (read as webdataset reads it: the first dot of the file name splits key and extension, so ``img.0001.png``
  is key ``img`` with extension ``0001.png``, which is no image);
* at load time: an image that cannot be fully decoded, or whose header already shows more than
  ``max_pixels`` pixels (checked before decoding), yields ``Sample.image = None`` and ``Sample.error``; an
  image the model's ``ImageTransform`` refuses (``max_pixels``, ``max_aspect_ratio``: checked before any
  resize) is turned into an invalid row by ``ClipCollator``.
  Loading may happen in a DataLoader worker, whose memory is thrown away, so ``__getitem__`` never writes to
  the log. Instead ``ClipCollator`` keeps the sample as an invalid row (``valid=False``) and lists it in
  ``batch["skipped"]``; the main process then calls ``dataset.record_skipped(batch)``. The log de-duplicates
  by dataset index, so a second epoch over the same corrupt file does not count it twice.

The run fails (``DataError``) only when the skipped fraction exceeds ``max_skipped_fraction`` (1% by default):
checked right after indexing and again by ``dataset.end_pass()``. Data that would be silently wrong rather
than merely incomplete is an error naming the culprits: a tar member that appears twice, or a key that comes
back after other keys (``webdataset.index_tar``: which copy is the sample's?), two files of one kind for one
key in a ``files`` folder (``a.jpg`` and ``a.JPG``), or two samples with the same key.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..utils.images import IMAGE_EXTENSIONS
from ..utils.io import atomic_file, escape_field
from ..utils.keys import first_few
from .processing import MAX_PIXELS, check_image_size
from .webdataset import Member, TarError, index_tar, read_member

FORMATS = ("files", "webdataset", "csv", "jsonl", "sharegpt4v")
_SAMPLE_FILES = (*IMAGE_EXTENSIONS, "txt", "json")  # the extensions a sample's files are read from
# Open tar handles kept per process; bounded so thousands of shards never exhaust file descriptors.
_MAX_OPEN_SHARDS = 16


class DataError(ValueError):
    """The data cannot be used as given (too many bad samples, no samples, unreadable index file)."""


@dataclass(frozen=True, slots=True)
class Record:
    """Where one sample lives. ``offset < 0``: ``path`` is an image file; else ``size`` bytes at ``offset``
    inside the tar ``path``."""

    key: str
    caption: str
    path: str
    offset: int = -1
    size: int = -1


@dataclass(frozen=True, slots=True)
class Sample:
    """One loaded sample. ``image`` is fully decoded (in the file's own mode), or None when it could not be
    decoded (``error`` says why)."""

    index: int
    key: str
    image: Image.Image | None
    caption: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SkipEntry:
    key: str
    path: str
    reason: str  # "<category>: <detail>"; the summary counts by category

    @property
    def category(self) -> str:
        return self.reason.partition(":")[0]


class SkipLog:
    """Counts and names skipped samples; fails the run above ``max_fraction`` of all samples."""

    def __init__(self, max_fraction: float = 0.01) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.entries: list[SkipEntry] = []
        self._seen_indices: dict[int, SkipEntry] = {}

    def add(self, key: str, path: str, reason: str, index: int | None = None) -> None:
        """Record one skipped sample. ``index`` (a dataset index) de-duplicates load-time skips across passes."""
        entry = SkipEntry(key, path, reason)
        if index is not None:
            if index in self._seen_indices:
                return
            self._seen_indices[index] = entry
        self.entries.append(entry)

    def load_time(self) -> list[list]:
        """The load-time skips (found while decoding, by dataset index) as JSON-able ``[index, key, path,
        reason]`` rows: what a pass stores with its artifacts (embedding chunks, training checkpoints), so a
        resumed or rerun pass counts them again instead of forgetting samples it does not decode twice."""
        return [[i, e.key, e.path, e.reason] for i, e in self._seen_indices.items()]

    def restore(self, rows: list[list]) -> None:
        """Re-add rows of ``load_time()`` (de-duplicated by index, like any load-time skip)."""
        for index, key, path, reason in rows:
            self.add(key, path, reason, index=int(index))

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> Counter[str]:
        return Counter(e.category for e in self.entries)

    def summary(self, total: int | None = None) -> str:
        """One line for the end of a pass, e.g. ``skipped 3 of 1000 samples (0.30%): unreadable image 2, ...``."""
        n = len(self.entries)
        of = f" of {total} samples ({n / total:.2%}, limit {self.max_fraction:.2%})" if total else " samples"
        detail = ", ".join(f"{cat} {c}" for cat, c in sorted(self.counts().items()))
        return f"skipped {n}{of}" + (f": {detail}" if detail else "")

    def check(self, total: int) -> None:
        """Raise ``DataError`` naming the first skipped samples when more than ``max_fraction`` of ``total``."""
        if total <= 0 or len(self.entries) / total <= self.max_fraction:
            return
        examples = "; ".join(f"{e.key} ({e.path}): {e.reason}" for e in self.entries[:5])
        raise DataError(f"{self.summary(total)}. First skipped: {examples}")

    def write(self, path: str | os.PathLike) -> None:
        """Write ``key<TAB>path<TAB>reason`` lines atomically (temp file, then rename). Control characters
        and backslashes are written as C-style escapes, so a file name with a newline stays on its line."""
        with atomic_file(path, encoding="utf-8") as f:
            f.write("key\tpath\treason\n")
            for e in self.entries:
                f.write("\t".join(escape_field(x) for x in (e.key, e.path, e.reason)) + "\n")


def _read_record(rec: Record) -> bytes:
    """A record's bytes through a file handle of its own (safe from any thread): a whole file, or a tar member."""
    with open(rec.path, "rb") as f:
        if rec.offset < 0:
            return f.read()
        f.seek(rec.offset)
        return _whole_member(f.read(rec.size), rec)


def _whole_member(data: bytes, rec: Record) -> bytes:
    if len(data) != rec.size:
        raise OSError(f"tar ended after {len(data)} of {rec.size} bytes")
    return data


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style image-caption dataset over an index of ``Record``; ``__getitem__`` decodes the image fully."""

    def __init__(
        self, records: list[Record], skips: SkipLog, source: str = "", max_pixels: int | None = MAX_PIXELS
    ) -> None:
        self.records = records
        self.skips = skips
        self.source = source
        self.max_pixels = max_pixels  # images above this are skipped before decoding (None: no cap)
        # Samples the source offered, including those skipped while indexing: the denominator of the
        # skipped fraction.
        self.total = len(records) + len(skips)
        self._shards: OrderedDict[str, io.BufferedReader] = OrderedDict()
        self._pid = os.getpid()
        self._cache: list[bytes | None] | None = None  # image bytes, after preload()

    def __len__(self) -> int:
        return len(self.records)

    def preload(self, threads: int = 16) -> None:
        """Read every image's bytes into memory once (decoding stays per sample). For small images on a file
        system that serves small files slowly; a file that cannot be read is left to fail at decode time."""

        def read(rec: Record) -> bytes | None:
            try:
                return _read_record(rec)
            except OSError:
                return None

        with ThreadPoolExecutor(threads) as pool:
            self._cache = list(pool.map(read, self.records, chunksize=256))

    def __getitem__(self, index: int) -> Sample:
        index = int(index)  # samplers may hand numpy or tensor integers; Sample.index is a plain int
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} samples")
        index %= len(self.records)
        rec = self.records[index]
        try:
            data = self._read_bytes(rec, index)
            image = Image.open(io.BytesIO(data))
            # The header gives the size: refuse a pixel bomb before decoding it.
            too_large = check_image_size(image.size, self.max_pixels, None)
            if too_large:
                return Sample(index, rec.key, None, rec.caption, too_large)
            # load() decodes every pixel, so a truncated file fails here rather than later in the transform.
            # The mode is left as decoded: colour conversion (and how transparency is flattened) belongs to
            # the model's image transform, so there is one rule for it.
            image.load()
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...) for bad bytes
            return Sample(index, rec.key, None, rec.caption, f"unreadable image: {type(e).__name__}: {e}")
        return Sample(index, rec.key, image, rec.caption)

    def _read_bytes(self, rec: Record, index: int | None = None) -> bytes:
        if self._cache is not None and index is not None and self._cache[index] is not None:
            return self._cache[index]
        if rec.offset < 0:
            return _read_record(rec)
        f = self._shard(rec.path)  # tar members: one open handle per shard and process
        f.seek(rec.offset)
        return _whole_member(f.read(rec.size), rec)

    def _shard(self, path: str) -> io.BufferedReader:
        # A forked DataLoader worker inherits the parent's handles, whose shared file position would race
        # with the parent's; each process opens its own.
        if self._pid != os.getpid():
            self._shards, self._pid = OrderedDict(), os.getpid()
        f = self._shards.get(path)
        if f is None:
            f = open(path, "rb")  # kept open across reads; closed when evicted
            self._shards[path] = f
            if len(self._shards) > _MAX_OPEN_SHARDS:
                self._shards.popitem(last=False)[1].close()
        self._shards.move_to_end(path)
        return f

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()  # file handles cannot be pickled (spawned workers)
        return state

    def record_skipped(self, batch: dict) -> int:
        """Log the invalid rows of a collated batch (main process); returns how many there were."""
        invalid = (~batch["valid"]).nonzero().flatten().tolist()
        for row, reason in zip(invalid, batch["skipped"], strict=True):
            index = int(batch["index"][row])
            rec = self.records[index]
            self.skips.add(rec.key, rec.path, reason.removeprefix(f"{rec.key}: "), index=index)
        return len(invalid)

    def end_pass(self, log_path: str | os.PathLike | None = None) -> str:
        """Finish a pass: write the skip log if asked, fail above the threshold, return the summary line."""
        if log_path is not None:
            self.skips.write(log_path)
        self.skips.check(self.total)
        return self.skips.summary(self.total)


# --------------------------------------------------------------------------------------------------------
# Indexing


def open_dataset(
    source: str | os.PathLike,
    format: str = "auto",
    *,
    caption: str = "txt",
    image_key: str | None = None,
    caption_key: str | None = None,
    root: str | os.PathLike | None = None,
    separator: str = "\t",
    max_skipped_fraction: float = 0.01,
    max_pixels: int | None = MAX_PIXELS,
) -> ImageTextDataset:
    """Index an image-caption source and return a map-style dataset.

    Args:
        source: an img2dataset "files" folder; a webdataset ``.tar``, a folder of them, or a brace/glob
            pattern (``shards/{00000..00009}.tar``; several joined by ``::``); a ``.csv``/``.tsv``; a
            ``.jsonl``; a ShareGPT4V ``.json`` array.
        format: ``auto`` (by extension / folder content) or one of ``files``, ``webdataset``, ``csv``,
            ``jsonl``, ``sharegpt4v``.
        caption: for ``files``/``webdataset``: ``txt`` reads the ``.txt``; ``json:KEY`` reads KEY from the
            sample's ``.json`` metadata.
        image_key, caption_key: column / field names. Defaults: CSV ``filepath``/``title`` (open_clip's),
            JSONL ``image``/``caption``, ShareGPT4V ``image`` (the caption is ``conversations[1].value``).
        root: folder that relative image paths are resolved against (default: the index file's folder).
        separator: CSV field separator; tab by default, as open_clip.
        max_skipped_fraction: fail with ``DataError`` when more samples than this are skipped.
        max_pixels: images with more pixels (read from the header) are skipped before decoding.
    """
    source = os.fspath(source)
    fmt = _detect_format(source) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if fmt in ("files", "webdataset"):
        if caption != "txt" and not caption.startswith("json:"):
            raise ValueError(f"caption must be 'txt' or 'json:KEY', got {caption!r}")
    elif caption != "txt":
        raise ValueError(f"caption={caption!r} applies to files/webdataset layouts; for {fmt} use caption_key")
    skips = SkipLog(max_skipped_fraction)
    if fmt == "files":
        records = _index_files(source, caption, skips)
    elif fmt == "webdataset":
        records = _index_tars(source, caption, skips)
    else:
        index_file = Path(source)
        if not index_file.is_file():
            raise FileNotFoundError(f"{fmt} index file {source} does not exist")
        base = Path(root) if root is not None else index_file.parent
        if fmt == "csv":
            rows = _csv_rows(index_file, image_key or "filepath", caption_key or "title", separator)
        elif fmt == "jsonl":
            rows = _jsonl_rows(index_file, image_key or "image", caption_key or "caption")
        else:
            rows = _sharegpt_rows(index_file, image_key or "image")
        records = _index_rows(rows, base, skips)
    _check_unique_keys(records, source)
    dataset = ImageTextDataset(records, skips, source, max_pixels)
    if not records:
        raise DataError(f"no usable samples in {source} ({fmt})" + (f"; {skips.summary()}" if len(skips) else ""))
    skips.check(dataset.total)
    return dataset


def _detect_format(source: str) -> str:
    lower = source.lower()
    if "::" in source or any(c in source for c in "*?[{"):
        return "webdataset"
    if os.path.isdir(source):
        has_tar = any(name.lower().endswith(".tar") for name in os.listdir(source))
        return "webdataset" if has_tar else "files"
    for ext, fmt in (
        (".tar", "webdataset"),
        (".csv", "csv"),
        (".tsv", "csv"),
        (".jsonl", "jsonl"),
        (".json", "sharegpt4v"),
    ):
        if lower.endswith(ext):
            return fmt
    if not os.path.exists(source):
        raise FileNotFoundError(f"data source {source} does not exist")
    raise ValueError(f"cannot tell the format of {source}; pass format= (one of {', '.join(FORMATS)})")


def _caption_from(members: dict[str, bytes | None], caption: str, key: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason) from a sample's ``txt`` / ``json`` member contents."""
    if caption == "txt":
        raw = members.get("txt")
        if raw is None:
            return None, f"missing caption: no {key}.txt"
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the caption
        except UnicodeDecodeError as e:
            return None, f"unreadable caption: {key}.txt is not UTF-8 ({e})"
    else:
        field = caption.removeprefix("json:")
        raw = members.get("json")
        if raw is None:
            return None, f"missing caption: no {key}.json"
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"unreadable caption: {key}.json is not valid JSON ({e})"
        text = meta.get(field) if isinstance(meta, dict) else None
        if not isinstance(text, str):
            return None, f"missing caption: {key}.json has no string field {field!r}"
    text = text.strip()
    if not text:
        return None, "empty caption"
    return text, None


def _index_files(folder: str, caption: str, skips: SkipLog) -> list[Record]:
    """img2dataset ``files`` layout: group every folder's files by key (file name without extension).

    Grouping by key, not sorting separate image and caption lists, is what keeps a key with an image but no
    caption from shifting every later pair onto the wrong image.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder} does not exist")
    caption_ext = "txt" if caption == "txt" else "json"
    records: list[Record] = []
    dirs = sorted(d for d, _, _ in os.walk(folder, followlinks=True))  # a linked shard folder is data too
    for d in tqdm(dirs, desc=f"indexing {folder}", unit="dir", disable=None, leave=False):
        groups: dict[str, dict[str, str]] = {}
        for entry in os.scandir(d):
            stem, ext = os.path.splitext(entry.name)
            ext = ext[1:].lower()
            # *_stats.json and *.parquet sit beside img2dataset shards and describe them, not a sample.
            if entry.is_file() and ext in _SAMPLE_FILES and not (ext == "json" and stem.endswith("_stats")):
                group = groups.setdefault(stem, {})
                if ext in group:  # a.jpg and a.JPG: which one is the sample's?
                    raise DataError(f"{d} holds two .{ext} files for key {stem!r}: {group[ext]} and {entry.path}")
                group[ext] = entry.path
        for stem in sorted(groups):
            files = groups[stem]
            key = os.path.relpath(os.path.join(d, stem), folder).replace(os.sep, "/")
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is None:
                if caption_ext in files or "txt" in files:  # a lone .json is metadata, not a sample
                    skips.add(key, os.path.join(d, stem), "missing image: no image file for this key")
                continue
            members = {}
            if caption_ext in files:
                with open(files[caption_ext], "rb") as f:
                    members[caption_ext] = f.read()
            text, reason = _caption_from(members, caption, stem)
            if reason:
                skips.add(key, image, reason)
            else:
                records.append(Record(key, text, image))
    return records


def _expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b{x,y}`` -> ``a0bx a0by a1bx ...``; zero-padded ranges keep their width, as webdataset."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [out for c in choices for out in _expand_braces(head + c + tail)]


def _tar_paths(source: str) -> list[str]:
    paths: list[str] = []
    for part in source.split("::"):
        if os.path.isdir(part):
            shards = sorted(os.path.join(part, n) for n in os.listdir(part) if n.lower().endswith(".tar"))
            if not shards:  # with other parts beside it, it would add nothing without a word
                raise FileNotFoundError(f"webdataset folder {part} holds no .tar shard")
            paths += shards
            continue
        expansions = _expand_braces(part)
        if not expansions:
            raise FileNotFoundError(f"webdataset pattern {part} names no shard (a range that counts down?)")
        for expanded in expansions:
            matches = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
            missing = [p for p in matches if not os.path.isfile(p)]
            if missing or not matches:
                raise FileNotFoundError(f"webdataset shard {missing[0] if missing else expanded} does not exist")
            paths += matches
    paths = list(dict.fromkeys(paths))  # a shard named twice would double its samples
    if not paths:
        raise FileNotFoundError(f"no .tar shards found in {source}")
    return paths


def _index_tars(source: str, caption: str, skips: SkipLog) -> list[Record]:
    """webdataset shards: one pass over each tar's headers, reading only the small caption members."""
    caption_ext = "txt" if caption == "txt" else "json"
    records: list[Record] = []
    for path in tqdm(_tar_paths(source), desc="indexing shards", unit="tar", disable=None, leave=False):
        try:
            groups = index_tar(path)
        except TarError as e:
            raise DataError(str(e)) from e
        with open(path, "rb") as f:
            contents = {
                key: {caption_ext: read_member(f, m[caption_ext])} if caption_ext in m else {}
                for key, m in groups.items()
            }
        _skip_dotted_keys(path, groups, skips)
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            name = f"{os.path.basename(path)}/{key}"
            if image is None:
                if caption_ext in members or "txt" in members:
                    skips.add(name, path, "missing image: no image member for this key")
                continue
            text, reason = _caption_from(contents[key], caption, key)
            if reason:
                skips.add(name, path, reason)
            else:
                records.append(Record(name, text, path, image.offset, image.size))
    return records


def _skip_dotted_keys(path: str, groups: dict[str, dict[str, Member]], skips: SkipLog) -> None:
    """Count a sample whose key has a dot in it as webdataset reads it: ``img.0001.png`` is key ``img`` with
    extension ``0001.png``, which is no image. One skip per sample the writer meant (the name up to its last
    dot); a dotted extension of a sample that has its image (``key.seg.png``) is an extra field, not a skip."""
    for key, members in groups.items():
        if any(e in members for e in IMAGE_EXTENSIONS):
            continue
        dotted = [(m.name, ext) for ext, m in members.items() if "." in ext and ext.rpartition(".")[2] in _SAMPLE_FILES]
        for meant in dict.fromkeys(name.rpartition(".")[0] for name, _ in dotted):
            example, ext = next((n, e) for n, e in dotted if n.rpartition(".")[0] == meant)
            skips.add(
                f"{os.path.basename(path)}/{meant}",
                path,
                f"dotted key: webdataset reads {example} as key {key!r} with extension {ext!r}; "
                "keys must not contain dots",
            )


def _check_unique_keys(records: list[Record], source: str) -> None:
    """Two samples under one key would be confused by every later step that names samples by key."""
    counts = Counter(r.key for r in records)
    repeated = [f"{k} ({n}x)" for k, n in counts.items() if n > 1]
    if repeated:
        raise DataError(
            f"{source} has duplicate sample keys: {first_few(repeated, 5)} (e.g. two shards with the same file name "
            "in different folders); give every sample a unique key"
        )


# A row of a CSV/JSONL/ShareGPT4V index: (key, image path or None, caption or None, problem or None).
Row = tuple[str, str | None, str | None, str | None]


def _index_rows(rows: Iterator[Row], base: Path, skips: SkipLog) -> list[Record]:
    records: list[Record] = []
    for key, image, text, problem in tqdm(rows, desc="indexing", unit=" rows", disable=None, leave=False):
        path = os.fspath(base / image) if image else ""
        if problem:
            skips.add(key, path, problem)
        elif not image:
            skips.add(key, path, "missing image: no image path")
        elif not os.path.isfile(path):
            skips.add(key, path, "missing image: file does not exist")
        elif text is None:
            skips.add(key, path, "missing caption")
        elif not text.strip():
            skips.add(key, path, "empty caption")
        else:
            records.append(Record(key, text.strip(), path))
    return records


def _not_utf8(text: str) -> str | None:
    """Where ``text`` (decoded with ``errors="surrogateescape"``) holds a byte that is not UTF-8, or None."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return f"byte 0x{ord(ch) - 0xDC00:02x} at character {i + 1}"
    return None


def _csv_rows(path: Path, image_key: str, caption_key: str, separator: str) -> Iterator[Row]:
    # surrogateescape: a bad byte spoils its row only, which is then skipped and named. utf-8-sig: a byte-order
    # mark would otherwise be part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=separator)
        try:
            yield from _csv_records(path, reader, image_key, caption_key, separator)
        except csv.Error as e:  # e.g. an unmatched quote running past the field size limit
            raise DataError(f"{path}: unreadable at line {reader.line_num}: {e}") from None


def _csv_records(path: Path, reader: csv.DictReader, image_key: str, caption_key: str, separator: str) -> Iterator[Row]:
    columns = reader.fieldnames or []
    missing = [c for c in (image_key, caption_key) if c not in columns]
    if missing:
        raise DataError(
            f"{path} has no column {missing[0]!r} (columns: {columns}); set image_key/caption_key, "
            f"or separator (now {separator!r})"
        )
    for row in reader:
        key = f"{path.name}:{reader.line_num}"
        extra = row.pop(None, None)
        if extra:  # DictReader puts the cells past the header's under None: a caption cut at a separator
            yield key, None, None, f"bad row: {len(columns) + len(extra)} cells where the header has {len(columns)}"
            continue
        if any("\n" in v or "\r" in v for v in row.values() if isinstance(v, str)):  # only a quote spans lines
            yield key, None, None, "bad row: a cell runs over several lines (a caption with an unmatched quote?)"
            continue
        bad = next((f"column {c!r}: {w}" for c, v in row.items() if isinstance(v, str) and (w := _not_utf8(v))), None)
        if bad:
            yield key, None, None, f"unreadable row: not UTF-8 ({bad})"
            continue
        # DictReader fills absent trailing cells with None; a short row simply lacks that field.
        yield key, row[image_key], row[caption_key], None


def _jsonl_rows(path: Path, image_key: str, caption_key: str) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            key = f"{path.name}:{line_num}"
            bad = _not_utf8(line)
            if bad:
                yield key, None, None, f"unreadable row: not UTF-8 ({bad})"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield key, None, None, f"bad record: invalid JSON ({e})"
                continue
            if not isinstance(obj, dict):
                yield key, None, None, "bad record: not a JSON object"
                continue
            image, text = obj.get(image_key), obj.get(caption_key)
            yield key, image if isinstance(image, str) else None, text if isinstance(text, str) else None, None


def _sharegpt_rows(path: Path, image_key: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of ShareGPT4V records, found {type(data).__name__}")
    used: set[str] = set()
    for i, rec in enumerate(data):
        key = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
        # The id names the image: two captions of one image are two samples, the later keyed id#2, id#3, ...
        # (the first record of an image keeps the id as its key, so runs indexed before keep their keys).
        if key in used:
            n = 2
            while f"{key}#{n}" in used:
                n += 1
            key = f"{key}#{n}"
        used.add(key)
        try:
            text = rec["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            yield key, None, None, "missing caption: no conversations[1].value"
            continue
        image = rec.get(image_key)
        bad = next((w for v in (text, image) if isinstance(v, str) and (w := _not_utf8(v))), None)
        if bad:
            yield key, None, None, f"unreadable record: not UTF-8 ({bad})"
            continue
        yield key, image if isinstance(image, str) else None, text if isinstance(text, str) else None, None
