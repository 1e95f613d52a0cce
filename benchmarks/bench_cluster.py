"""Feature store + clustering time for 100k and 1M rows of 768-d features (ViT-L/14 projection width).

Measures, per size: writing the image and text features into the memory-mapped FeatureStore in chunks (as the
embedding pass does), clipmoe's clustering of both modalities (faiss k-means 3 x 3, accumulated labels), and
as the reference, in the same run, scikit-learn's MiniBatchKMeans on the same features (what the official
CLIP-MoE notebook uses). Features are random unit vectors around a few centres, so the clusters are real.

    python benchmarks/bench_cluster.py            # 100k and 1M rows (needs ~7 GB of disk and RAM)
    python benchmarks/bench_cluster.py --quick    # 20k rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from clipmoe.dmu.cluster import cluster_features
from clipmoe.dmu.embed import DONE, FeatureStore


def fake_features(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, dim)).astype(np.float32)
    x = centres[rng.integers(0, 5, n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench(n: int, dim: int, folder: str) -> dict:
    img, txt = fake_features(n, dim, 0), fake_features(n, dim, 1)
    t0 = time.perf_counter()
    store = FeatureStore(folder, n, dim, "w+")
    chunk = 4096
    for i in range(0, n, chunk):
        store.image[i : i + chunk] = img[i : i + chunk]
        store.text[i : i + chunk] = txt[i : i + chunk]
        store.valid[i : i + chunk] = 1
    for arr in (store.image, store.text, store.valid):
        arr.flush()
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"num_samples": n, "dim": dim}, f)
    open(os.path.join(folder, DONE), "w").close()
    write_s = time.perf_counter() - t0
    del store

    t0 = time.perf_counter()
    labels = cluster_features(FeatureStore.open(folder), 3, 3, seed=0)
    faiss_s = time.perf_counter() - t0
    assert len(np.unique(labels)) == 9

    from sklearn.cluster import MiniBatchKMeans

    t0 = time.perf_counter()
    for x in (img, txt):
        MiniBatchKMeans(n_clusters=3, batch_size=min(n, 65536), n_init="auto", random_state=0).fit_predict(x)
    sklearn_s = time.perf_counter() - t0
    return {"rows": n, "store_write_s": write_s, "cluster_s": faiss_s, "sklearn_s": sklearn_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dim", type=int, default=768)
    args = p.parse_args()
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.dim}-d features"
    )
    print("| rows | feature store write (s) | clipmoe cluster, faiss 3x3 (s) | MiniBatchKMeans 3x3 (s) | speed-up |")
    print("|---|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            r = bench(n, args.dim, d)
        print(
            f"| {n:,} | {r['store_write_s']:.1f} | {r['cluster_s']:.1f} | {r['sklearn_s']:.1f} | "
            f"{r['sklearn_s'] / r['cluster_s']:.1f}x |"
        )


if __name__ == "__main__":
    main()
