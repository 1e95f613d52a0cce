"""Pseudo-labels for MCL: k-means per modality, combined and accumulated across stages.

Stage s clusters the image features and the text features of the stage-s model separately (faiss k-means,
seeded), combines them as ``id = text_cluster * k_image + image_cluster`` and appends the id to the earlier
stages' label: ``label = previous_label * (k_image * k_text) + id``. Samples in one accumulated cluster share
every earlier stage's view, so batching within a cluster forces the next stage to learn something new.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from ..utils.io import write_json
from .embed import FeatureStore


def kmeans(features: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """Cluster ids of each row (faiss; trains on at most 256 points per centroid, assigns all rows)."""
    n = features.shape[0]
    if k > n:
        raise ValueError(f"cannot make {k} k-means clusters from {n} samples")
    x = np.ascontiguousarray(features, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def cluster_features(
    store: FeatureStore,
    k_image: int = 3,
    k_text: int = 3,
    previous: np.ndarray | None = None,
    seed: int = 0,
    chunk: int = 1 << 20,
    niter: int = 25,
) -> np.ndarray:
    """Accumulated pseudo-labels for every sample of ``store`` (-1 for samples whose image was unreadable)."""
    valid = np.asarray(store.valid, dtype=bool)
    rows = np.flatnonzero(valid)
    img = np.concatenate([store.image[rows[i : i + chunk]] for i in range(0, len(rows), chunk)])
    txt = np.concatenate([store.text[rows[i : i + chunk]] for i in range(0, len(rows), chunk)])
    ids = kmeans(txt, k_text, seed, niter) * k_image + kmeans(img, k_image, seed + 1, niter)
    labels = np.full(store.num_samples, -1, np.int64)
    base = previous[rows] if previous is not None else np.zeros(len(rows), np.int64)
    if previous is not None and (base < 0).any():
        raise ValueError("previous labels mark a sample invalid that this stage embedded as valid")
    labels[rows] = base * (k_image * k_text) + ids
    return labels


def cluster_stats(labels: np.ndarray) -> dict:
    valid = labels[labels >= 0]
    values, counts = np.unique(valid, return_counts=True)
    order = np.argsort(-counts)
    return {
        "samples": int(len(valid)),
        "invalid": int((labels < 0).sum()),
        "clusters": int(len(values)),
        "largest": int(counts.max()) if len(counts) else 0,
        "smallest": int(counts.min()) if len(counts) else 0,
        "sizes": {str(int(values[i])): int(counts[i]) for i in order},
    }


def write_cluster_outputs(folder: str, labels: np.ndarray, title: str) -> dict:
    """``labels.npy``, ``stats.json`` and a cluster-size histogram PNG, written atomically."""
    os.makedirs(folder, exist_ok=True)
    stats = cluster_stats(labels)
    tmp = os.path.join(folder, "labels.tmp.npy")
    np.save(tmp, labels)
    write_json(os.path.join(folder, "stats.json"), stats)
    _plot_sizes(stats, os.path.join(folder, "cluster_sizes.png"), title)
    os.replace(tmp, os.path.join(folder, "labels.npy"))  # labels.npy appearing = stage finished
    return stats


def _plot_sizes(stats: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(stats["sizes"].values())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(sizes)), sizes, color="#4472c4")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("samples")
    ax.set_title(f"{title}: {stats['clusters']} clusters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
