"""Text-to-image search over a folder of images, with any CLIP or CLIP-MoE clipmoe can open.

``clipmoe index IMAGES_DIR --model M --out INDEX`` embeds every image under IMAGES_DIR into a faiss
``IndexFlatIP`` over L2-normalised features (inner product = cosine similarity; exact search, which is right
up to a few million images); ``clipmoe search INDEX "a red cube on the left"`` prints the best matches.

An index folder holds ``index.faiss`` (row i = image i), ``index.json`` (the model path and fingerprint, the
image folder, the dtype used, and the relative path, size and mtime of image i) and ``skipped.log``
(unreadable files and why). Indexing is resumable: each chunk of embedded images is saved to
``INDEX/partial/`` as soon as it is done, and a rerun embeds only images that are in neither the finished
index nor a saved chunk with the size and mtime they have now. The same rule makes a rerun over a grown
folder incremental, and a rerun after an image was overwritten re-embeds it (no stale features). Unreadable
files are skipped, counted and logged, and retried by the next run (they may have been fixed); FIFOs, devices
and other non-regular files are never opened (a FIFO named ``x.png`` would block forever), only listed as
skipped. The finished folder is written next to INDEX and renamed into place, so a reader never sees a
half-written index; a write that fails (disk full) removes its temporaries and names the file.

Every file of an index is validated when opened: a corrupt or foreign file is one ``IndexFileError`` naming
it. File names are printed and logged with C-style escapes for control characters (``utils.io.escape_field``),
so a name with a newline cannot forge a line of output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..formats.hub import resolve_model
from ..formats.load import WEIGHT_FILES, load
from ..utils.dtypes import DTYPES, torch_dtype
from ..utils.images import IMAGE_EXTENSIONS, is_image_file
from ..utils.io import atomic_file, atomic_folder, escape_field, io_failure, write_error, write_json

CLI_INDEX_HELP = """Embed a folder of images into a text-searchable faiss index (resumable).

Walks IMAGES_DIR recursively for image files, embeds them with --model in chunks saved as they finish (a
rerun continues where a killed run stopped, and adds images new to the folder), and writes INDEX. Files
that cannot be decoded are skipped, counted and listed in INDEX/skipped.log.
"""
CLI_SEARCH_HELP = """Find the images of an index that best match a text query.

Uses the model the index was built with; prints one "score<TAB>path" line per hit, best first, with control
characters and backslashes in paths written as C-style escapes, or JSON (paths as they are). An empty query
is refused.
"""

INDEX_FILE, META_FILE, SKIPPED_FILE, PARTIAL_DIR = "index.faiss", "index.json", "skipped.log", "partial"
FORMAT_VERSION = 1
Stamp = tuple[int, int]  # (size in bytes, mtime in ns) of an image file when it was embedded


class IndexFileError(ValueError):
    """A file of an index folder is corrupt, truncated or not what clipmoe wrote."""


@dataclass
class Hit:
    """One search result: image id (row of the index), path, cosine similarity."""

    id: int
    path: str
    score: float


@dataclass
class IndexReport:
    """What one ``build_index`` run did."""

    indexed: int  # images in the finished index
    embedded: int  # images embedded by this run (the rest came from earlier runs)
    skipped: list[tuple[str, str]]  # (relative path, reason) of files that could not be read


def list_images(images_dir: str) -> list[str]:
    """Relative paths of the regular image files under ``images_dir``, sorted, hidden folders excluded."""
    return list(scan_images(images_dir)[0])


def scan_images(images_dir: str) -> tuple[dict[str, Stamp], list[tuple[str, str]]]:
    """``{relative path: (size, mtime_ns)}`` of the regular image files under ``images_dir`` (sorted), and
    ``(relative path, reason)`` of image-named entries that are not regular files (FIFOs, devices, sockets,
    broken links): those are never opened, since reading a FIFO blocks until someone writes to it."""
    found: dict[str, Stamp] = {}
    irregular: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not is_image_file(name):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, images_dir)
            try:
                st = os.stat(path)  # follows links: a link to an image file is that file
            except OSError as e:
                irregular.append((rel, f"cannot stat: {e.strerror}"))
                continue
            if stat.S_ISREG(st.st_mode):
                found[rel] = (st.st_size, st.st_mtime_ns)
            else:
                irregular.append((rel, f"not a regular file ({_file_kind(st.st_mode)})"))
    return dict(sorted(found.items())), sorted(irregular)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "socket" if stat.S_ISSOCK(mode) else "directory" if stat.S_ISDIR(mode) else "special file"


def model_fingerprint(model_path: str) -> str:
    """A cheap content fingerprint of a model folder or file: its config and, per weight file, the size plus
    the first and last MiB. It survives copying (unlike mtimes), and retraining changes it; hashing whole
    multi-GB weight files on every run would cost as much as loading them."""
    files = [model_path] if os.path.isfile(model_path) else [os.path.join(model_path, "config.json")]
    if os.path.isdir(model_path):
        files += [os.path.join(model_path, w) for w in WEIGHT_FILES if os.path.exists(os.path.join(model_path, w))]
    h = hashlib.sha256()
    for path in files:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def resolve_device(device: str | None) -> str:
    """``None`` means the GPU when there is one."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(model_path: str, device: str | None = None, dtype: str = "float32"):
    """Open a model for feature extraction: on ``device``, weights in ``dtype``, routers kept fp32."""
    model = load(model_path, device=resolve_device(device), dtype=torch_dtype(dtype))
    for part in ("tokenizer", "image_processor"):
        if getattr(model, part, None) is None:
            raise ValueError(f"{model_path} has no {part.replace('_', ' ')} files; text-to-image search needs both")
    return model


def build_index(
    images_dir: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 1024,
    device: str | None = None,
    dtype: str = "float32",
    workers: int = 4,
    progress: bool = True,
) -> IndexReport:
    """Embed every image under ``images_dir`` with the model at ``model`` into the index folder ``out``.

    Resumes (or extends) an existing index or partial run in ``out`` built with the same model; a different
    model is an error, since features of two models cannot share an index. ``workers`` threads decode
    images while the model runs (PIL releases the GIL while decoding).
    """
    images_dir, out = (os.path.abspath(os.fspath(p)) for p in (images_dir, out))
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"no such image folder: {images_dir}")
    # A hub id becomes its snapshot folder in the HF cache: the index records that pinned commit's files.
    model_path = os.path.abspath(resolve_model(model))
    if batch_size < 1 or chunk_size < 1 or workers < 1:
        raise ValueError("batch_size, chunk_size and workers must be >= 1")
    files, irregular = scan_images(images_dir)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {images_dir}")
    settings = {"model": model_path, "model_fingerprint": model_fingerprint(model_path), "dtype": dtype}
    partial = os.path.join(out, PARTIAL_DIR)
    _prepare_out(out, settings)

    # relative path -> (feature row, stamp when embedded), from the finished index and saved chunks
    have = _done_features(out)
    todo = [f for f, stamp in files.items() if f not in have or have[f][1] != stamp]  # new or changed
    skipped: list[tuple[str, str]] = list(irregular)
    if todo:
        net = load_for_inference(model_path, device, dtype)
        next_chunk = sum(name.endswith(".npz") for name in os.listdir(partial))
        with (
            tqdm(total=len(todo), desc="index", unit="img", disable=not progress) as bar,
            ThreadPoolExecutor(workers) as pool,
        ):
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                feats, ok, bad = _embed_files(net, images_dir, chunk, batch_size, pool, bar)
                skipped += bad
                if ok:
                    stamps = [files[p] for p in ok]
                    _save_chunk(os.path.join(partial, f"chunk-{next_chunk:06d}.npz"), feats, ok, stamps)
                    next_chunk += 1
                    have.update((p, (f, s)) for p, f, s in zip(ok, feats, stamps))
    # A file that changed and now fails to read keeps no feature: a stale one would answer for it.
    paths = [f for f, stamp in files.items() if f in have and have[f][1] == stamp]
    stamps = [files[p] for p in paths]
    if not todo and not skipped and _finished(out) == (paths, stamps, 0):  # nothing new, gone or failing
        shutil.rmtree(partial)
        return IndexReport(indexed=len(paths), embedded=0, skipped=[])
    if not paths:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise ValueError(f"none of the {len(files)} image files under {images_dir} could be read ({reasons}, ...)")
    meta = {
        "format": FORMAT_VERSION,
        **settings,
        "images_dir": images_dir,
        "paths": paths,
        "sizes": [s for s, _ in stamps],
        "mtimes": [m for _, m in stamps],
    }
    _write_index(out, np.stack([have[p][0] for p in paths]), meta, skipped)
    return IndexReport(indexed=len(paths), embedded=len(todo) - (len(skipped) - len(irregular)), skipped=skipped)


def _prepare_out(out: str, settings: dict) -> None:
    """Create ``out/partial``, or check that what ``out`` already holds was built with the same model."""
    partial = os.path.join(out, PARTIAL_DIR)
    manifest = os.path.join(partial, "manifest.json")
    records = [p for p in (os.path.join(out, META_FILE), manifest) if os.path.exists(p)]
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not records):
        raise ValueError(f"{out} exists and is not a clipmoe image index; choose another --out")
    for path in records:
        recorded = _read_json(path)
        previous = {k: recorded.get(k) for k in settings}
        if previous != settings:
            raise ValueError(
                f"{out} was built with model {previous['model']} (fingerprint {previous['model_fingerprint']}, "
                f"dtype {previous['dtype']}), not {settings['model']} (fingerprint "
                f"{settings['model_fingerprint']}, dtype {settings['dtype']}); their features cannot share "
                "an index: choose another --out or delete it"
            )
    os.makedirs(partial, exist_ok=True)
    if not os.path.exists(manifest):
        write_json(manifest, settings)


def _done_features(out: str) -> dict[str, tuple[np.ndarray, Stamp | None]]:
    """Features already computed, with the stamp of the file they were computed from (None: unknown, as in
    indexes written before stamps were recorded; such files are embedded again)."""
    have: dict[str, tuple[np.ndarray, Stamp | None]] = {}
    if os.path.exists(os.path.join(out, META_FILE)):
        index = ImageIndex(out)
        stamps = index.stamps or [None] * len(index)
        have.update(zip(index.relative_paths, zip(index.index.reconstruct_n(0, index.index.ntotal), stamps)))
    partial = os.path.join(out, PARTIAL_DIR)
    for name in sorted(os.listdir(partial)):
        if name.endswith(".npz"):
            paths, features, stamps = _load_chunk(os.path.join(partial, name))
            have.update(zip(paths, zip(features, stamps)))
    return have


def _load_chunk(path: str) -> tuple[list[str], np.ndarray, list[Stamp | None]]:
    try:
        with np.load(path, allow_pickle=False) as chunk:
            paths, features = chunk["paths"].tolist(), np.asarray(chunk["features"], np.float32)
            sizes = chunk["sizes"].tolist() if "sizes" in chunk else None
            mtimes = chunk["mtimes"].tolist() if "mtimes" in chunk else None
    except Exception as e:  # zipfile, numpy and KeyError all mean the same: this chunk is unusable
        raise IndexFileError(
            f"{path} is corrupt ({type(e).__name__}: {e}); delete it and rerun: its images are embedded again"
        ) from None
    n = len(paths)
    if features.ndim != 2 or len(features) != n or any(len(x) != n for x in (sizes or [], mtimes or []) if x):
        raise IndexFileError(f"{path} is inconsistent ({n} paths, features {features.shape}); delete it and rerun")
    stamps = list(zip(sizes, mtimes)) if sizes is not None and mtimes is not None else [None] * n
    return paths, features, stamps


def _finished(out: str) -> tuple[list[str], list[Stamp] | None, int] | None:
    """Paths, stamps and skipped-file count of the finished index in ``out``, if there is one."""
    if not os.path.exists(os.path.join(out, META_FILE)):
        return None
    meta = _read_json(os.path.join(out, META_FILE))
    return meta["paths"], _meta_stamps(meta), meta["skipped"]


def _meta_stamps(meta: dict) -> list[Stamp] | None:
    if meta.get("sizes") is None or meta.get("mtimes") is None:
        return None
    return [(int(s), int(m)) for s, m in zip(meta["sizes"], meta["mtimes"])]


def _read_json(path: str) -> dict:
    """A JSON object from an index file, or one ``IndexFileError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise IndexFileError(f"{path} is corrupt: a JSON {type(obj).__name__}, not an object")
    return obj


def _read_image(path: str, transform) -> torch.Tensor | str:
    """The transformed image, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            # The header gives the size: refuse pixel bombs and extreme aspect ratios before decoding.
            refused = transform.check(image) if hasattr(transform, "check") else None
            if refused:
                return refused
            image.load()
            return transform(image)
    # PIL reports broken files with many exception types (OSError, SyntaxError, ValueError,
    # DecompressionBombError, struct.error, ...); any of them means "skip this file".
    except Exception as e:
        return f"{type(e).__name__}: {e}".replace("\n", " ")


def _embed_files(
    model, images_dir: str, files: list[str], batch_size: int, pool, bar
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """L2-normalised fp32 features of the readable ``files``, those files, and (file, reason) of the rest."""
    param = model.vision_model.embeddings.patch_embedding.weight  # device and dtype (CLIP and SigLIP alike)
    feats, ok, bad = [], [], []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        loaded = pool.map(lambda f: _read_image(os.path.join(images_dir, f), model.image_processor), batch)
        tensors = []
        for rel, item in zip(batch, loaded):
            if isinstance(item, str):
                bad.append((rel, item))
            else:
                tensors.append(item)
                ok.append(rel)
        if tensors:
            with torch.inference_mode():
                x = model.encode_image(torch.stack(tensors).to(param.device, param.dtype))
            feats.append(_normalise(x))
        bar.update(len(batch))
    dim = model.config.projection_dim
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), ok, bad


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def _save_chunk(path: str, features: np.ndarray, paths: list[str], stamps: list[Stamp]) -> None:
    sizes, mtimes = (np.array([s[i] for s in stamps], dtype=np.int64) for i in (0, 1))
    with atomic_file(path, "wb") as f:
        np.savez(f, features=features.astype(np.float32), paths=np.array(paths, dtype=str), sizes=sizes, mtimes=mtimes)


def _write_index(out: str, features: np.ndarray, meta: dict, skipped: list[tuple[str, str]]) -> None:
    """Write the finished index into a sibling temp folder, then swap it in (dropping ``partial/``)."""
    with atomic_folder(out) as tmp:
        index = faiss.IndexFlatIP(features.shape[1])
        index.add(np.ascontiguousarray(features, dtype=np.float32))
        blob = faiss.serialize_index(index)  # written by Python, so a full disk is an OSError, not a C++ abort
        target = INDEX_FILE  # a failed write names the file; atomic_folder removes the temporary folder
        try:
            with open(os.path.join(tmp, INDEX_FILE), "wb") as f:
                f.write(blob.tobytes())
            target = META_FILE
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump({**meta, "dim": int(features.shape[1]), "skipped": len(skipped)}, f, indent=1)
            target = SKIPPED_FILE
            with open(os.path.join(tmp, SKIPPED_FILE), "w", encoding="utf-8") as f:
                f.writelines(f"{escape_field(path)}\t{escape_field(reason)}\n" for path, reason in skipped)
        except OSError as e:
            raise write_error(os.path.join(out, target), io_failure(e) or str(e), tmp) from e


class ImageIndex:
    """A finished index folder: the faiss index, the image paths, and the model that embedded them."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = os.fspath(folder)
        meta_path = os.path.join(folder, META_FILE)
        if not os.path.exists(meta_path):
            hint = (
                " (an unfinished run: rerun clipmoe index)" if os.path.isdir(os.path.join(folder, PARTIAL_DIR)) else ""
            )
            raise FileNotFoundError(f"{folder} holds no finished clipmoe image index{hint}")
        self.meta = _read_json(meta_path)
        if self.meta.get("format") != FORMAT_VERSION:
            raise IndexFileError(
                f"{meta_path} has index format {self.meta.get('format')!r}; this clipmoe reads {FORMAT_VERSION}"
            )
        _check_meta(self.meta, meta_path)
        self.relative_paths: list[str] = self.meta["paths"]
        self.stamps: list[Stamp] | None = _meta_stamps(self.meta)
        self.index = _read_faiss(os.path.join(folder, INDEX_FILE), self.meta["dim"])
        if self.index.ntotal != len(self.relative_paths):
            raise IndexFileError(
                f"{folder} is inconsistent: {self.index.ntotal} vectors in {INDEX_FILE} for "
                f"{len(self.relative_paths)} paths in {META_FILE}; rebuild it"
            )
        self.model_path: str = self.meta["model"]
        self._model = None
        self._model_key: tuple | None = None

    def __len__(self) -> int:
        return self.index.ntotal

    def path(self, i: int) -> str:
        return os.path.join(self.meta["images_dir"], self.relative_paths[i])

    def model(self, device: str | None = None, dtype: str | None = None):
        """The index's model (loaded once per device/dtype); ``dtype`` defaults to the one used for indexing."""
        key = (resolve_device(device), dtype or self.meta["dtype"])
        if self._model_key != key:
            if not os.path.exists(self.model_path):
                raise FileNotFoundError(f"the index's model {self.model_path} no longer exists")
            if model_fingerprint(self.model_path) != self.meta["model_fingerprint"]:
                print(
                    f"warning: the model at {self.model_path} changed since the index was built; "
                    "scores may be meaningless until you rebuild it",
                    file=sys.stderr,
                )
            self._model, self._model_key = load_for_inference(self.model_path, *key), key
        return self._model

    def search(
        self, queries: str | Sequence[str], top_k: int = 5, device: str | None = None, dtype: str | None = None
    ) -> list[list[Hit]]:
        """The ``top_k`` best images for each query, best first (one list per query)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        queries = [queries] if isinstance(queries, str) else list(queries)
        if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
            raise ValueError("the search query is empty; give some words to search for")
        model = self.model(device, dtype)
        text = model.tokenizer(queries)
        with torch.inference_mode():
            q = _normalise(model.encode_text(**{k: v.to(model.device) for k, v in text.items()}))
        scores, ids = self.index.search(q, min(top_k, len(self)))
        return [
            [Hit(int(i), self.path(int(i)), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
            for row_s, row_i in zip(scores, ids)
        ]


def _check_meta(meta: dict, path: str) -> None:
    """Every field the index needs, with its type: a hand-edited or foreign ``index.json`` fails here, once."""
    fields = {"model": str, "model_fingerprint": str, "images_dir": str, "dtype": str, "paths": list, "dim": int}
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise IndexFileError(f"{path} is corrupt: {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(p, str) for p in meta["paths"]):
        raise IndexFileError(f"{path} is corrupt: 'paths' must be a list of strings")
    if meta["dtype"] not in DTYPES or meta["dim"] < 1:
        raise IndexFileError(f"{path} is corrupt: dtype {meta['dtype']!r}, dim {meta['dim']!r}")
    for key in ("sizes", "mtimes"):
        values = meta.get(key)
        if values is not None and (
            not isinstance(values, list)
            or len(values) != len(meta["paths"])
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        ):
            raise IndexFileError(f"{path} is corrupt: {key!r} must be one integer per path")


def _read_faiss(path: str, dim: int):
    """The flat inner-product index clipmoe writes, checked before faiss parses it."""
    if not os.path.isfile(path):
        raise IndexFileError(f"{path} is missing; rebuild the index with clipmoe index")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"IxFI":
        raise IndexFileError(f"{path} is corrupt: not a flat inner-product faiss index (starts with {magic!r})")
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:  # faiss reports every malformed file as a RuntimeError with a C++ location
        detail = str(e).rpartition("Error: ")[2].splitlines()[0][:150]
        raise IndexFileError(f"{path} is corrupt or truncated ({detail}); rebuild the index") from None
    if index.d != dim:
        raise IndexFileError(f"{path} holds {index.d}-dim vectors but index.json says {dim}; rebuild the index")
    return index


def add_index_arguments(parser) -> None:
    parser.add_argument("images_dir", help="folder of images (searched recursively)")
    parser.add_argument(
        "--model", required=True, help="model folder, checkpoint file or Hugging Face id owner/name[@revision]"
    )
    parser.add_argument("--out", required=True, help="index folder to write (or resume)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024, help="images per saved progress chunk")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    _add_precision_arguments(parser, default_dtype="float32")


def add_search_arguments(parser) -> None:
    parser.add_argument("index", help="index folder written by clipmoe index")
    parser.add_argument("query", help="text to search for")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of lines")
    _add_precision_arguments(parser, default_dtype=None)


def _add_precision_arguments(parser, default_dtype: str | None) -> None:
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=default_dtype,
        help="weights and activations dtype; routers stay float32"
        + ("" if default_dtype else " (default: the dtype the index was built with)"),
    )


def run_index(args) -> int:
    report = build_index(
        args.images_dir,
        args.model,
        args.out,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
    )
    print(f"indexed {report.indexed} images ({report.embedded} embedded by this run) into {args.out}")
    if report.skipped:
        names = ", ".join(escape_field(p) for p, _ in report.skipped[:5]) + (", ..." if len(report.skipped) > 5 else "")
        print(f"skipped {len(report.skipped)} unreadable files ({names}); see {os.path.join(args.out, SKIPPED_FILE)}")
    return 0


def run_search(args) -> int:
    hits = ImageIndex(args.index).search(args.query, args.top_k, args.device, args.dtype)[0]
    if args.json:
        results = [{"rank": r + 1, "path": h.path, "score": h.score} for r, h in enumerate(hits)]
        print(json.dumps({"query": args.query, "results": results}, indent=1))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{escape_field(h.path)}")
    return 0
