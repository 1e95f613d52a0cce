"""Benchmark the data path: decode + preprocess + collate, in images/s per DataLoader worker.

Two workloads, written to a webdataset tar in a temporary folder and read through ``clipmoe.data``:

- ``jpeg``: 256-400 px JPEGs (random aspect ratios) -> 224 px, the preprocessing of real CLIP checkpoints;
- ``png``: 64 px PNGs -> 64 px, the images of the generated world and the small shipped model.

Three collators run over the same dataset and DataLoader settings, so only the preprocessing differs:

- ``clipmoe``: ``ClipCollator`` with ``clipmoe.data.processing.ImageTransform``;
- ``hf``: the reference, HF ``CLIPImageProcessor`` (PIL backend) with the same settings and tokenizer;
- ``decode``: reading and fully decoding only, the floor both share.

Loaders keep their workers alive (``persistent_workers``) and get one warm-up pass, so the numbers are
steady-state throughput, not process start-up. Variants run interleaved round by round; reported numbers
are medians over rounds, and the ratio is the median of per-round ratios clipmoe / hf.

    python benchmarks/bench_data.py                 # about a minute on 2 cores
    python benchmarks/bench_data.py --quick         # smoke run
    python benchmarks/bench_data.py --workers 0 4 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipmoe.data import ClipCollator, open_dataset
from clipmoe.data.processing import ImageTransform, TextTokenizer, build_word_tokenizer

WORDS = "a photo of red green blue cube sphere cone small large left right".split()


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth gradient with a few blocks and mild noise: compresses and decodes like a photo, unlike noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * rng.uniform(120, 255, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        base[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_shard(path: str, n: int, kind: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            if kind == "jpeg":
                image, ext, fmt = (
                    synthetic_image(rng, *rng.integers(256, 401, 2)),
                    "jpg",
                    {"format": "JPEG", "quality": 90},
                )
            else:
                image, ext, fmt = synthetic_image(rng, 64, 64), "png", {"format": "PNG"}
            buf = io.BytesIO()
            image.save(buf, **fmt)
            caption = " ".join(rng.choice(WORDS, 8))
            for name, data in ((f"{i:06d}.{ext}", buf.getvalue()), (f"{i:06d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class HFCollator:
    """The reference: same batch dict, pixels from HF ``CLIPImageProcessor`` (PIL backend)."""

    def __init__(self, tokenizer: TextTokenizer, transform: ImageTransform) -> None:
        try:  # transformers 5 names the PIL implementation; 4.x's CLIPImageProcessor is it
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        config = {k: v for k, v in transform.to_processor_config().items() if k != "image_processor_type"}
        self.processor, self.tokenizer = Processor(**config), tokenizer

    def __call__(self, samples):
        pixels = self.processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        return {
            "index": torch.tensor([s.index for s in samples]),
            "pixel_values": pixels,
            **self.tokenizer([s.caption for s in samples]),
        }


def decode_only(samples):
    return len(samples)


def timed_pass(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def bench_workload(kind: str, n: int, workers: list[int], rounds: int, batch_size: int, folder: str, bar) -> list[dict]:
    shard = os.path.join(folder, f"{kind}.tar")
    write_shard(shard, n, kind)
    dataset = open_dataset(shard)
    crop = 224 if kind == "jpeg" else 64
    transform = ImageTransform(size=crop, crop_size=crop)
    tokenizer = TextTokenizer(build_word_tokenizer(WORDS, context_length=16), 16)
    collators = {
        "clipmoe": ClipCollator(tokenizer, transform),
        "hf": HFCollator(tokenizer, transform),
        "decode": decode_only,
    }
    loaders = {
        (name, w): DataLoader(dataset, batch_size=batch_size, num_workers=w, collate_fn=fn, persistent_workers=w > 0)
        for w in workers
        for name, fn in collators.items()
    }
    for loader in loaders.values():  # warm-up: start workers, fill caches
        timed_pass(loader)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in loaders}
    keys = list(loaders)
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(timed_pass(loaders[key]))
            bar.update(1)
    del loaders  # shuts the persistent workers down
    rows = []
    for w in workers:
        rate = {name: statistics.median(n / t for t in times[(name, w)]) for name in collators}
        ratio = statistics.median(h / c for c, h in zip(times[("clipmoe", w)], times[("hf", w)]))
        rows.append(
            {
                "workload": f"{kind} -> {crop}px",
                "workers": w,
                "clipmoe_img_s": rate["clipmoe"],
                "clipmoe_img_s_per_worker": rate["clipmoe"] / max(w, 1),
                "hf_img_s": rate["hf"],
                "decode_img_s": rate["decode"],
                "speedup_vs_hf": ratio,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| workload | workers | clipmoe img/s | per worker | HF CLIPImageProcessor img/s | clipmoe / HF | decode only img/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['workers']} | {r['clipmoe_img_s']:.0f} | {r['clipmoe_img_s_per_worker']:.0f} | "
            f"{r['hf_img_s']:.0f} | {r['speedup_vs_hf']:.2f}x | {r['decode_img_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=192, help="number of 256-400 px JPEGs")
    parser.add_argument("--pngs", type=int, default=768, help="number of 64 px PNGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.quick:
        args.jpegs, args.pngs, args.rounds = 32, 64, 1
    # One intra-op thread per process: the work here is PIL/numpy per image, and torch's thread pool would
    # only contend with the workers for the same cores.
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    rows = []
    total = len(args.workers) * 3 * args.rounds * 2
    with tempfile.TemporaryDirectory() as folder, tqdm(total=total, desc="passes", leave=False) as bar:
        rows += bench_workload("jpeg", args.jpegs, args.workers, args.rounds, args.batch_size, folder, bar)
        rows += bench_workload("png", args.pngs, args.workers, args.rounds, args.batch_size, folder, bar)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
