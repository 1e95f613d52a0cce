"""Text-to-image search over a folder of images, with any CLIP or CLIP-MoE clipmoe can open.

``clipmoe index IMAGES_DIR --model M --out INDEX`` embeds every image under IMAGES_DIR into a faiss
``IndexFlatIP`` over L2-normalised features (inner product = cosine similarity; exact search, which is right
up to a few million images); ``clipmoe search INDEX "a red cube on the left"`` prints the best matches.

An index folder holds ``index.faiss`` (row i = image i), ``index.json`` (the model path and fingerprint, the
image folder, the dtype used, and the relative path of image i) and ``skipped.log`` (unreadable files and
why). Indexing is resumable: each chunk of embedded images is saved to ``INDEX/partial/`` as soon as it is
done, and a rerun embeds only images that are in neither the finished index nor a saved chunk. The same
rule makes a rerun over a grown folder incremental. Unreadable files are skipped, counted and logged, and
retried by the next run (they may have been fixed). The finished folder is written next to INDEX and
renamed into place, so a reader never sees a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..formats.load import WEIGHT_FILES, load
from ..utils.dtypes import DTYPES, torch_dtype
from ..utils.images import IMAGE_EXTENSIONS, is_image_file
from ..utils.io import atomic_file, atomic_folder, write_json

CLI_INDEX_HELP = """Embed a folder of images into a text-searchable faiss index (resumable).

Walks IMAGES_DIR recursively for image files, embeds them with --model in chunks saved as they finish (a
rerun continues where a killed run stopped, and adds images new to the folder), and writes INDEX. Files
that cannot be decoded are skipped, counted and listed in INDEX/skipped.log.
"""
CLI_SEARCH_HELP = """Find the images of an index that best match a text query.

Uses the model the index was built with; prints one "score<TAB>path" line per hit, best first, or JSON.
"""

INDEX_FILE, META_FILE, SKIPPED_FILE, PARTIAL_DIR = "index.faiss", "index.json", "skipped.log", "partial"
FORMAT_VERSION = 1


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
    """Relative paths of the image files under ``images_dir``, sorted, hidden folders excluded."""
    found = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(root, f), images_dir) for f in files if is_image_file(f))
    return sorted(found)


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
    images_dir, model_path, out = (os.path.abspath(os.fspath(p)) for p in (images_dir, model, out))
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"no such image folder: {images_dir}")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"no model at {model_path}")
    if batch_size < 1 or chunk_size < 1 or workers < 1:
        raise ValueError("batch_size, chunk_size and workers must be >= 1")
    files = list_images(images_dir)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {images_dir}")
    settings = {"model": model_path, "model_fingerprint": model_fingerprint(model_path), "dtype": dtype}
    partial = os.path.join(out, PARTIAL_DIR)
    _prepare_out(out, settings)

    have = _done_features(out)  # relative path -> feature row, from the finished index and saved chunks
    todo = [f for f in files if f not in have]
    skipped: list[tuple[str, str]] = []
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
                    _save_chunk(os.path.join(partial, f"chunk-{next_chunk:06d}.npz"), feats, ok)
                    next_chunk += 1
                    have.update(zip(ok, feats))
    paths = [f for f in files if f in have]
    if not todo and _finished(out) == (paths, 0):  # nothing new, nothing gone, nothing failing: leave it be
        shutil.rmtree(partial)
        return IndexReport(indexed=len(paths), embedded=0, skipped=[])
    if not paths:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise ValueError(f"none of the {len(files)} image files under {images_dir} could be read ({reasons}, ...)")
    meta = {"format": FORMAT_VERSION, **settings, "images_dir": images_dir, "paths": paths}
    _write_index(out, np.stack([have[p] for p in paths]), meta, skipped)
    return IndexReport(indexed=len(paths), embedded=len(todo) - len(skipped), skipped=skipped)


def _prepare_out(out: str, settings: dict) -> None:
    """Create ``out/partial``, or check that what ``out`` already holds was built with the same model."""
    partial = os.path.join(out, PARTIAL_DIR)
    manifest = os.path.join(partial, "manifest.json")
    records = [p for p in (os.path.join(out, META_FILE), manifest) if os.path.exists(p)]
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not records):
        raise ValueError(f"{out} exists and is not a clipmoe image index; choose another --out")
    for path in records:
        with open(path) as f:
            recorded = json.load(f)
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


def _done_features(out: str) -> dict[str, np.ndarray]:
    have: dict[str, np.ndarray] = {}
    if os.path.exists(os.path.join(out, META_FILE)):
        index = ImageIndex(out)
        have.update(zip(index.relative_paths, index.index.reconstruct_n(0, index.index.ntotal)))
    partial = os.path.join(out, PARTIAL_DIR)
    for name in sorted(os.listdir(partial)):
        if name.endswith(".npz"):
            with np.load(os.path.join(partial, name), allow_pickle=False) as chunk:
                have.update(zip(chunk["paths"].tolist(), chunk["features"]))
    return have


def _finished(out: str) -> tuple[list[str], int] | None:
    """Paths and skipped-file count of the finished index in ``out``, if there is one."""
    if not os.path.exists(os.path.join(out, META_FILE)):
        return None
    with open(os.path.join(out, META_FILE)) as f:
        meta = json.load(f)
    return meta["paths"], meta["skipped"]


def _read_image(path: str, transform) -> torch.Tensor | str:
    """The transformed image, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
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


def _save_chunk(path: str, features: np.ndarray, paths: list[str]) -> None:
    with atomic_file(path, "wb") as f:
        np.savez(f, features=features.astype(np.float32), paths=np.array(paths, dtype=str))


def _write_index(out: str, features: np.ndarray, meta: dict, skipped: list[tuple[str, str]]) -> None:
    """Write the finished index into a sibling temp folder, then swap it in (dropping ``partial/``)."""
    with atomic_folder(out) as tmp:
        index = faiss.IndexFlatIP(features.shape[1])
        index.add(np.ascontiguousarray(features, dtype=np.float32))
        faiss.write_index(index, os.path.join(tmp, INDEX_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({**meta, "dim": int(features.shape[1]), "skipped": len(skipped)}, f, indent=1)
        with open(os.path.join(tmp, SKIPPED_FILE), "w", encoding="utf-8") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in skipped)


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
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has index format {self.meta.get('format')!r}; this clipmoe reads {FORMAT_VERSION}"
            )
        self.index = faiss.read_index(os.path.join(folder, INDEX_FILE))
        self.relative_paths: list[str] = self.meta["paths"]
        if self.index.ntotal != len(self.relative_paths):
            raise ValueError(
                f"{folder} is inconsistent: {self.index.ntotal} vectors for {len(self.relative_paths)} paths"
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
        model = self.model(device, dtype)
        text = model.tokenizer(queries)
        with torch.inference_mode():
            q = _normalise(model.encode_text(**{k: v.to(model.device) for k, v in text.items()}))
        scores, ids = self.index.search(q, min(top_k, len(self)))
        return [
            [Hit(int(i), self.path(int(i)), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
            for row_s, row_i in zip(scores, ids)
        ]


def add_index_arguments(parser) -> None:
    parser.add_argument("images_dir", help="folder of images (searched recursively)")
    parser.add_argument("--model", required=True, help="model folder or checkpoint file")
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
        names = ", ".join(p for p, _ in report.skipped[:5]) + (", ..." if len(report.skipped) > 5 else "")
        print(f"skipped {len(report.skipped)} unreadable files ({names}); see {os.path.join(args.out, SKIPPED_FILE)}")
    return 0


def run_search(args) -> int:
    hits = ImageIndex(args.index).search(args.query, args.top_k, args.device, args.dtype)[0]
    if args.json:
        results = [{"rank": r + 1, "path": h.path, "score": h.score} for r, h in enumerate(hits)]
        print(json.dumps({"query": args.query, "results": results}, indent=1))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{h.path}")
    return 0
