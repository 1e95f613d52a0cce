"""Benchmark evaluation throughput (images/s, texts/s) of a dense CLIP against its sparse-upcycled CLIP-MoE.

Both models are ViT-B/16 widths (vision 768 wide, 224 px, 16 px patches; text 512 wide, 77-token context)
with fewer blocks so that CPU runs stay short; the MoE is ``clipmoe.sparse_upcycle(dense, 4 experts, top-2)``
in every block of both towers. Each round runs the evaluation suite's own encoders
(``clipmoe.eval.encode_images`` / ``encode_texts``: preprocessing, batching, forward, normalisation) on
the same in-memory images and captions for both models, interleaved so that load from other processes hits
both alike. Reported: medians over rounds, and the median of per-round MoE/dense time ratios.

    python benchmarks/bench_eval.py --quick        # < 2 min smoke run on CPU
    python benchmarks/bench_eval.py --layers 12 --device cuda --images 256 --texts 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import clipmoe
from bench_model import vit_b16_config
from bench_moe import environment, interleaved_times, median_ratio
from clipmoe.data.processing import ImageTransform, TextTokenizer, build_word_tokenizer
from clipmoe.eval import encode_images, encode_texts
from clipmoe.model.modeling import ClipMoeModel

WORDS = (
    "a photo of the red green blue yellow small large cube sphere cone on left right of next to striped dotted".split()
)


def build_dense(layers: int) -> ClipMoeModel:
    """A randomly initialised CLIP with ViT-B/16 widths and ``layers`` blocks per tower."""
    tokenizer = build_word_tokenizer(WORDS, context_length=77)
    config = vit_b16_config(
        layers,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = ClipMoeModel(config)
    model.tokenizer = TextTokenizer(tokenizer, 77)
    model.image_processor = ImageTransform(size=224, crop_size=224)
    return model.eval()


def make_inputs(num_images: int, num_texts: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """Random 256 x 320 photos-sized images (resized and cropped by the transform) and 8-20 word captions."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(num_images)]
    texts = [" ".join(rng.choice(WORDS, rng.integers(8, 21))) for _ in range(num_texts)]
    return images, texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 blocks, 8 images, 64 texts, 3 rounds")
    p.add_argument("--layers", type=int, default=4, help="blocks per tower (ViT-B/16 has 12)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--images", type=int, default=32, help="images encoded per round")
    p.add_argument("--texts", type=int, default=256, help="captions encoded per round")
    p.add_argument("--batch-size", type=int, default=32, help="image batch (texts use 8x)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every sample and summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.images, args.texts, args.rounds = 2, 8, 64, 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None  # None: the fp32 weights' own precision
    dense = build_dense(args.layers)
    moe = clipmoe.sparse_upcycle(dense, num_experts=args.experts, top_k=args.top_k, noise=0.01, seed=args.seed)
    images, texts = make_inputs(args.images, args.texts, args.seed)
    kw = {"device": device, "dtype": dtype}

    variants = {}
    for name, model in (("dense", dense), ("moe", moe)):
        variants[f"{name} images"] = lambda m=model: encode_images(m, images, batch_size=args.batch_size, **kw)
        variants[f"{name} texts"] = lambda m=model: encode_texts(m, texts, batch_size=8 * args.batch_size, **kw)
    bar = tqdm(total=args.rounds, desc="rounds", unit="round")
    times = interleaved_times(variants, args.rounds, device, bar=bar)
    bar.close()

    counts = {"images": args.images, "texts": args.texts}
    rows = []
    for kind in ("images", "texts"):
        rate = {n: counts[kind] / statistics.median(times[f"{n} {kind}"]) for n in ("dense", "moe")}
        ratio = median_ratio(times, f"moe {kind}", f"dense {kind}")
        rows.append({"input": kind, "dense_per_s": rate["dense"], "moe_per_s": rate["moe"], "moe_time_ratio": ratio})

    params = {n: m.parameter_counts() for n, m in (("dense", dense), ("moe", moe))}
    env = environment()
    print(f"\n{env}, device={args.device}, dtype={args.dtype}, blocks/tower={args.layers}, ViT-B/16 widths")
    print(f"experts={args.experts}, top_k={args.top_k}, MoE in every block; rounds={args.rounds}")
    print(
        f"params: dense {params['dense']['total'] / 1e6:.1f}M; moe {params['moe']['total'] / 1e6:.1f}M total, ", end=""
    )
    print(f"{params['moe']['active'] / 1e6:.1f}M active\n")
    print("| input | dense /s | MoE /s | MoE/dense time (median of per-round ratios) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['dense_per_s']:.1f} | {r['moe_per_s']:.1f} | {r['moe_time_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "results": rows, "samples_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
