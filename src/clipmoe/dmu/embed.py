"""Embed a whole training set (L2-normalised image and text features) into an on-disk feature store.

The store is three memory-mapped files written by sample index (``image.f32``, ``text.f32``, ``valid.u8``),
so it works for datasets larger than RAM, and ranks write disjoint rows of the same files: rank r embeds
chunks r, r + W, r + 2W, ... A chunk is marked done only after its rows are flushed, so rerunning after a
kill re-embeds at most the chunks that were in flight.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..train.distributed import DistEnv, barrier, on_main
from ..utils import interrupt
from ..utils.io import write_error, write_json

DONE = "DONE"


class FeatureStore:
    """Row-addressed features of one dataset: ``image[N, D]``, ``text[N, D]`` and ``valid[N]``."""

    def __init__(self, folder: str, num_samples: int, dim: int, mode: str = "r") -> None:
        self.folder, self.num_samples, self.dim = folder, num_samples, dim
        shape = (num_samples, dim)
        self.image = np.memmap(os.path.join(folder, "image.f32"), np.float32, mode, shape=shape)
        self.text = np.memmap(os.path.join(folder, "text.f32"), np.float32, mode, shape=shape)
        self.valid = np.memmap(os.path.join(folder, "valid.u8"), np.uint8, mode, shape=(num_samples,))

    @classmethod
    def create(cls, folder: str, num_samples: int, dim: int) -> None:
        """Allocate the store's files on disk up front. A memory-mapped file that is only extended (sparse)
        meets a full disk on some later page write, and the process dies of SIGBUS naming nothing; allocating
        the blocks now turns that into one error naming the file, before any embedding work."""
        sizes = {"image.f32": 4 * num_samples * dim, "text.f32": 4 * num_samples * dim, "valid.u8": num_samples}
        for name, size in sizes.items():
            path = os.path.join(folder, name)
            try:
                with open(path, "wb") as f:
                    if size:
                        os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                for other in sizes:  # all or nothing: a rerun allocates the store again
                    if os.path.exists(os.path.join(folder, other)):
                        os.remove(os.path.join(folder, other))
                raise write_error(path, e.strerror or str(e), tmp=path) from e

    @classmethod
    def open(cls, folder: str) -> FeatureStore:
        if not os.path.exists(os.path.join(folder, DONE)):
            raise FileNotFoundError(f"{folder} holds no finished feature store")
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        return cls(folder, meta["num_samples"], meta["dim"], "r")


def embed_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    collate,
    folder: str,
    env: DistEnv | None = None,
    batch_size: int = 256,
    chunk_size: int = 2048,
    num_workers: int = 0,
    precision: str = "fp32",
    desc: str = "embed",
) -> FeatureStore:
    """Embed every sample of ``dataset`` into ``folder`` (resumable, sharded over ranks)."""
    env = env or DistEnv()
    n, dim = len(dataset), model.config.projection_dim
    if os.path.exists(os.path.join(folder, DONE)):
        return FeatureStore.open(folder)
    os.makedirs(os.path.join(folder, "chunks"), exist_ok=True)

    def allocate() -> None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({"num_samples": n, "dim": dim}, f)
        if not os.path.exists(os.path.join(folder, "image.f32")):
            FeatureStore.create(folder, n, dim)

    on_main(allocate, env)  # a full disk on rank 0 raises on every rank
    store = FeatureStore(folder, n, dim, "r+")
    chunks = range(env.rank, (n + chunk_size - 1) // chunk_size, env.world_size)
    todo = [c for c in chunks if not os.path.exists(_marker(folder, c))]
    skips = getattr(dataset, "skips", None)
    if skips is not None:  # finished chunks' skips first: the log keeps the order of an uninterrupted pass
        for c in chunks:
            if c not in todo:
                skips.restore(_chunk_skips(folder, c))
    model.to(env.device).eval()
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = tqdm(
        total=sum(min(chunk_size, n - c * chunk_size) for c in todo),
        desc=desc,
        unit="sample",
        disable=not env.is_main,
        dynamic_ncols=True,
    )
    with torch.no_grad(), autocast:
        for c in todo:
            rows = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
            batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
            for batch in loader:
                interrupt.check()
                idx = batch["index"].numpy()
                img = model.encode_image(batch["pixel_values"].to(env.device))
                txt = model.encode_text(batch["input_ids"].to(env.device), batch["attention_mask"].to(env.device))
                valid = batch["valid"].numpy()
                if batch.get("skipped") and hasattr(dataset, "record_skipped"):
                    dataset.record_skipped(batch)
                store.image[idx] = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
                store.text[idx] = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
                store.valid[idx] = valid.astype(np.uint8)
                bar.update(len(idx))
            for arr in (store.image, store.text, store.valid):
                arr.flush()
            # The chunk's skips are part of its result: a rerun that finds it done counts them again.
            lo, hi = rows[0], rows[-1] + 1
            found = [r for r in skips.load_time() if lo <= r[0] < hi] if skips is not None else []
            write_json(_marker(folder, c), {"skipped": found})
    bar.close()
    barrier(env)  # every rank's chunks are written, their skips in the chunk markers

    def finish() -> None:
        if hasattr(dataset, "end_pass"):
            if skips is not None:  # every chunk's skips, from earlier runs and other ranks too
                for c in range((n + chunk_size - 1) // chunk_size):
                    skips.restore(_chunk_skips(folder, c))
            summary = dataset.end_pass(os.path.join(folder, "skipped.log"))  # raises above the skip limit
            if len(dataset.skips):
                print(f"{desc}: {summary}")
        open(os.path.join(folder, DONE), "w").close()

    # Too many skips (or a failed write) on rank 0 raises the same DataError on every rank at once, instead of
    # rank 0 raising while the others wait at a barrier for the collective timeout.
    on_main(finish, env)
    return FeatureStore.open(folder)


def _chunk_skips(folder: str, chunk: int) -> list[list]:
    try:
        with open(_marker(folder, chunk)) as f:
            return json.load(f).get("skipped", [])
    except (OSError, ValueError, AttributeError):
        return []  # no marker (a rank's chunk not done), or an empty one written by an older version


def _marker(folder: str, chunk: int) -> str:
    return os.path.join(folder, "chunks", f"{chunk:06d}.ok")
